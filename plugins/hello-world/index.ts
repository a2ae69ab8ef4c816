// The sample plugin of a first run (config/plugins.toml enables it for team 1): a PostHog
// plugin as it would run on PostHog's own server, TypeScript and ESM, unchanged.
import { PluginEvent, PluginMeta } from '@posthog/plugin-scaffold'
import { URL } from 'url'

interface HelloConfig {
    greeting?: string
}

export function processEvent(event: PluginEvent, { config }: PluginMeta<{ config: HelloConfig }>): PluginEvent {
    const properties = event.properties ?? {}
    properties.greeting = config.greeting || 'hello from plugin-server'
    const url = properties.$current_url
    if (typeof url === 'string') {
        try {
            properties.$host = new URL(url).host
        } catch (_) {
            // Not a URL: leave the event as it came.
        }
    }
    event.properties = properties
    return event
}
