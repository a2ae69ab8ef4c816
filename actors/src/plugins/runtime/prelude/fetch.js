// `fetch` (global, and the `node-fetch` module): the server sends the request, within
// EXTERNAL_REQUEST_TIMEOUT_MS, and the promise settles with a node-fetch-like response.
(function (host) {
    'use strict'
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
    return fetch
})
