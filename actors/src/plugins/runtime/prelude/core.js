// The host side of every plugin VM, run once when the VM is created and before the plugin's own
// code. It receives the native functions as `host` and keeps them in closures, so plugins reach
// the host only through the objects built here (console, fetch, require, posthog, ...).
//
// Only what every VM needs is here. Buffer, console, crypto, fetch and the meta APIs are
// sections (the other files of this folder) that `host.section(name)` compiles on first use;
// the VM then keeps the value. Compiling all of them in every VM took most of a VM's build
// time and a third of its memory, while a plugin touches two or three.
(function (host) {
    'use strict'
    const g = globalThis

    const sections = {}
    function load(name) {
        if (!(name in sections)) {
            sections[name] = host.section(name)(host, load)
        }
        return sections[name]
    }
    // `target[name]` is the section's value, compiled on first read; assigning replaces it.
    // It stays an accessor: boa's inline caches keep treating a redefined global property of
    // the same name as the accessor it was, so it cannot become a data property later.
    function lazy(target, name, section, enumerable) {
        let value
        let loaded = false
        Object.defineProperty(target, name, {
            configurable: true,
            enumerable,
            get() {
                if (!loaded) {
                    value = load(section)
                    loaded = true
                }
                return value
            },
            set(replacement) {
                value = replacement
                loaded = true
            },
        })
    }

    class RetryError extends Error {
        constructor(message) {
            super(message)
            this.name = 'RetryError'
        }
    }

    const posthog = {
        capture(event, properties) {
            host.capture(String(event), properties === undefined ? {} : properties)
        },
    }
    lazy(posthog, 'api', 'api', true)

    const timers = {
        setTimeout(fn, ms, ...args) {
            return host.setTimeout(() => fn(...args), typeof ms === 'number' ? ms : 0)
        },
        clearTimeout(id) {
            host.clearTimeout(id)
        },
    }

    const modules = {
        url: { URL: g.URL, URLSearchParams: g.URLSearchParams },
        '@posthog/plugin-scaffold': { RetryError },
    }
    lazy(modules, 'crypto', 'crypto', true)
    lazy(modules, 'node-fetch', 'fetch', true)
    function require(name) {
        if (!Object.prototype.hasOwnProperty.call(modules, name)) {
            throw new Error(
                `Cannot find module '${name}': plugins may import only ${Object.keys(modules).join(', ')}`
            )
        }
        return modules[name]
    }

    const methods = [
        'setupPlugin', 'teardownPlugin', 'processEvent', 'processEventBatch', 'onEvent', 'exportEvents',
        'composeWebhook', 'runEveryMinute', 'runEveryHour', 'runEveryDay', 'jobs', 'getSettings',
    ]
    // PostHog reads exports from `module.exports`, then `exports.default`, then the original
    // `exports` object, then top-level declarations of a plain script.
    function resolveExports(module, exportsObject, locals) {
        const sources = [module.exports, module.exports && module.exports.default, exportsObject, locals]
        const found = {}
        for (const name of methods) {
            for (const source of sources) {
                if (source !== null && source !== undefined && source[name] !== undefined) {
                    found[name] = source[name]
                    break
                }
            }
        }
        return found
    }

    // meta's host APIs, each compiled when the plugin first reaches for it.
    function metaApis(meta) {
        for (const name of ['cache', 'storage', 'utils', 'geoip', 'jobs']) {
            lazy(meta, name, name, true)
        }
    }

    for (const [name, value] of Object.entries({ posthog, RetryError, ...timers })) {
        Object.defineProperty(g, name, { value, writable: true, configurable: true, enumerable: false })
    }
    lazy(g, 'console', 'console', false)
    lazy(g, 'fetch', 'fetch', false)
    lazy(g, 'Buffer', 'buffer', false)
    return { require, resolveExports, metaApis, buffer: () => load('buffer') }
})
