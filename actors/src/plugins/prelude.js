// The host side of every plugin VM, run once when the VM is created and before the plugin's own
// code. It receives the native functions as `host` and keeps them in this closure, so plugins
// reach the host only through the objects built here (console, fetch, require, posthog, ...).
(function (host) {
    'use strict'
    const g = globalThis

    // Node's Buffer, as far as plugins use it: attachments' `contents` and `digest()` results.
    // It is a Uint8Array (indexable, mutable) whose toString decodes, so `JSON.parse(contents)`
    // and `contents.toString()` give the text.
    class Buffer extends Uint8Array {
        toString(encoding) {
            return host.decode(this, encoding === undefined ? 'utf8' : String(encoding))
        }
        toJSON() {
            return { type: 'Buffer', data: Array.from(this) }
        }
        static from(value, encoding) {
            if (typeof value === 'string') {
                return new Buffer(host.encode(value, encoding === undefined ? 'utf8' : String(encoding)))
            }
            return new Buffer(value)
        }
        static isBuffer(value) {
            return value instanceof Buffer
        }
    }

    class RetryError extends Error {
        constructor(message) {
            super(message)
            this.name = 'RetryError'
        }
    }

    function formatArg(arg) {
        if (typeof arg === 'string') {
            return arg
        }
        if (arg instanceof Error) {
            // Node's stack starts with "Name: message"; boa's holds only the frames.
            const head = `${arg.name}: ${arg.message}`
            const stack = arg.stack ? String(arg.stack) : ''
            return stack === '' || stack.startsWith(head) ? stack || head : `${head}\n${stack}`
        }
        try {
            const text = JSON.stringify(arg)
            return text === undefined ? String(arg) : text
        } catch (_) {
            return String(arg)
        }
    }
    function logger(level) {
        return function (...args) {
            host.log(level, args.map(formatArg).join(' '))
        }
    }
    const console = {
        debug: logger('DEBUG'),
        log: logger('LOG'),
        info: logger('INFO'),
        warn: logger('WARN'),
        error: logger('ERROR'),
    }

    // Node's Hash and Hmac: the input is kept until digest(), which hashes it natively
    // (`key` is null for a plain hash).
    function hasher(algorithm, key) {
        const parts = []
        return {
            update(data) {
                parts.push(typeof data === 'string' ? data : new Uint8Array(data))
                return this
            },
            digest(encoding) {
                const bytes = new Buffer(host.hash(String(algorithm), parts, key))
                return encoding === undefined ? bytes : bytes.toString(encoding)
            },
        }
    }
    const createHash = (algorithm) => hasher(algorithm, null)
    const createHmac = (algorithm, key) => hasher(algorithm, key)

    class Headers {
        constructor(entries) {
            this._map = {}
            for (const [k, v] of Object.entries(entries || {})) {
                this._map[String(k).toLowerCase()] = String(v)
            }
        }
        get(name) {
            const value = this._map[String(name).toLowerCase()]
            return value === undefined ? null : value
        }
        has(name) {
            return String(name).toLowerCase() in this._map
        }
        forEach(fn) {
            for (const [k, v] of Object.entries(this._map)) fn(v, k, this)
        }
    }
    async function fetch(url, init) {
        const options = init || {}
        const headers = {}
        if (options.headers) {
            const source = options.headers instanceof Headers ? options.headers._map : options.headers
            for (const [k, v] of Object.entries(source)) headers[k] = String(v)
        }
        const body = options.body === undefined || options.body === null ? null : String(options.body)
        const timeout = typeof options.timeout === 'number' ? options.timeout : null
        const reply = host.fetch(String(url), String(options.method || 'GET'), headers, body, timeout)
        const text = reply.body
        return {
            status: reply.status,
            statusText: reply.statusText,
            ok: reply.status >= 200 && reply.status < 300,
            url: String(url),
            headers: new Headers(reply.headers),
            text: async () => text,
            json: async () => JSON.parse(text),
        }
    }
    fetch.default = fetch

    const posthog = {
        capture(event, properties) {
            host.capture(String(event), properties === undefined ? {} : properties)
        },
    }

    const timers = {
        setTimeout(fn, ms, ...args) {
            return host.setTimeout(() => fn(...args), typeof ms === 'number' ? ms : 0)
        },
        clearTimeout(id) {
            host.clearTimeout(id)
        },
    }

    // meta.cache: JSON by default, raw strings with { jsonSerialize: false } (PostHog's API).
    const cache = {
        async set(key, value, ttlSeconds, options) {
            const json = !options || options.jsonSerialize !== false
            host.cache('set', String(key), json ? JSON.stringify(value) : String(value), ttlSeconds)
        },
        async get(key, defaultValue, options) {
            const json = !options || options.jsonSerialize !== false
            const raw = host.cache('get', String(key))
            if (raw === null || raw === undefined) return defaultValue === undefined ? null : defaultValue
            return json ? JSON.parse(raw) : raw
        },
        async incr(key) { return host.cache('incr', String(key)) },
        async expire(key, ttlSeconds) { return host.cache('expire', String(key), ttlSeconds) },
        async lpush(key, elementOrArray) {
            const values = Array.isArray(elementOrArray) ? elementOrArray : [elementOrArray]
            return host.cache('lpush', String(key), values.map(String))
        },
        async lrange(key, startIndex, endIndex) { return host.cache('lrange', String(key), startIndex, endIndex) },
        async llen(key) { return host.cache('llen', String(key)) },
        async lrem(key, count, elementKey) { return host.cache('lrem', String(key), count, String(elementKey)) },
        async lpop(key, count) { return host.cache('lpop', String(key), count) },
    }

    // meta.storage: values are JSON; setting undefined deletes (PostHog's API).
    const storage = {
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
    const utils = {
        cursor: {
            async init(key, initialValue) {
                host.storage('cursorInit', String(key), initialValue === undefined ? 0 : initialValue)
            },
            async increment(key, incrementBy) {
                return host.storage('cursorIncrement', String(key), incrementBy === undefined ? 1 : incrementBy)
            },
        },
    }

    // PostHog's `meta.geoip`: a promise of geoip2-node's City, or null.
    const geoip = {
        async locate(ip) {
            return host.geoip(String(ip))
        },
    }

    // meta.jobs: `meta.jobs.<name>(payload, options)` then `.runNow()`, `.runIn(n, unit)` or
    // `.runAt(date)`, as in PostHog, for any name (the job must exist when it runs). `options`
    // is this server's: `{ maxAttempts, retryDelayMs }` (default 1 attempt, no retry).
    const jobs = new Proxy({}, {
        get(_, name) {
            if (typeof name !== 'string') return undefined
            return function (payload, options) {
                const json = JSON.stringify(payload === undefined ? {} : payload)
                const retry = options || {}
                const queue = (runAtMs) => {
                    host.jobs(name, json, Math.floor(runAtMs),
                        retry.maxAttempts === undefined ? 1 : Number(retry.maxAttempts),
                        retry.retryDelayMs === undefined ? 1000 : Number(retry.retryDelayMs))
                }
                return {
                    async runNow() { queue(Date.now()) },
                    async runIn(duration, unit) { queue(Date.now() + host.jobDelay(Number(duration), String(unit))) },
                    async runAt(date) {
                        const at = new Date(date).getTime()
                        if (Number.isNaN(at)) throw new TypeError(`runAt needs a date, got ${date}`)
                        queue(at)
                    },
                }
            }
        },
    })

    const modules = {
        crypto: { createHash, createHmac, randomUUID: () => host.randomUUID() },
        url: { URL: g.URL, URLSearchParams: g.URLSearchParams },
        'node-fetch': fetch,
        '@posthog/plugin-scaffold': { RetryError },
    }
    function require(name) {
        const module = modules[name]
        if (module === undefined) {
            throw new Error(
                `Cannot find module '${name}': plugins may import only ${Object.keys(modules).join(', ')}`
            )
        }
        return module
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

    for (const [name, value] of Object.entries({ console, fetch, posthog, RetryError, Buffer, ...timers })) {
        Object.defineProperty(g, name, { value, writable: true, configurable: true, enumerable: false })
    }
    return { require, resolveExports, Buffer, methods, cache, storage, utils, geoip, jobs }
})
