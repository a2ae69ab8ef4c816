// meta.storage: values are JSON; setting undefined deletes (PostHog's API).
(function (host) {
    'use strict'
    return {
        async get(key, defaultValue) {
            const raw = host.storage('get', String(key))
            if (raw === null || raw === undefined) return defaultValue === undefined ? null : defaultValue
            return JSON.parse(raw)
        },
        async set(key, value) {
            if (value === undefined) {
                host.storage('del', String(key))
            } else {
                host.storage('set', String(key), JSON.stringify(value))
            }
        },
        async del(key) { host.storage('del', String(key)) },
    }
})
