// meta.jobs: `meta.jobs.<name>(payload, options)` then `.runNow()`, `.runIn(n, unit)` or
// `.runAt(date)`, as in PostHog, for any name (the job must exist when it runs). `options`
// is this server's: `{ maxAttempts, retryDelayMs }` (default 1 attempt, no retry).
(function (host) {
    'use strict'
    return new Proxy({}, {
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
})
