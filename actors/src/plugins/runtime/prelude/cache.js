// meta.cache: JSON by default, raw strings with { jsonSerialize: false } (PostHog's API).
(function (host) {
    'use strict'
    return {
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
})
