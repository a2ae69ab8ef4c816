// meta.utils.cursor: a counter in meta.storage's table, initialised once and incremented atomically.
(function (host) {
    'use strict'
    return {
        cursor: {
            async init(key, initialValue) {
                host.storage('cursorInit', String(key), initialValue === undefined ? 0 : initialValue)
            },
            async increment(key, incrementBy) {
                return host.storage('cursorIncrement', String(key), incrementBy === undefined ? 1 : incrementBy)
            },
        },
    }
})
