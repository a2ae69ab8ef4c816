// `posthog.api`, PostHog's legacy plugin global beside `posthog.capture`: get, post, put, patch
// and delete against the PostHog app at SITE_URL (or `options.host`), sent as PostHog's server
// sends them. The query carries `token=<project API key>` (and a GET's `data`), the request
// `Authorization: Bearer <personal API key>`, a POST, PUT or PATCH `data` as JSON; `@current`
// in the path is the team's id. Without keys in the options, the server's own: the team's
// project token and its organization's plugin bot key. Each settles with fetch's response,
// whatever its status.
(function (host, load) {
    'use strict'
    // URLSearchParams' serialization (the VM has no URLSearchParams): spaces as '+', and only
    // letters, digits and *-._ left as they are.
    function query(params) {
        const encode = (value) =>
            encodeURIComponent(String(value))
                .replace(/%20/g, '+')
                .replace(/[!'()~]/g, (c) => '%' + c.charCodeAt(0).toString(16).toUpperCase())
        return Object.entries(params).map(([k, v]) => `${encode(k)}=${encode(v)}`).join('&')
    }
    async function request(method, path, options) {
        const opts = options || {}
        if (!opts.personalApiKey !== !opts.projectApiKey) {
            throw new Error('You must specify a personalApiKey if you specify a projectApiKey and vice-versa!')
        }
        const own = host.api(!opts.projectApiKey)
        const projectApiKey = opts.projectApiKey || own.projectApiKey
        const personalApiKey = opts.personalApiKey || own.personalApiKey
        const base = String(opts.host ?? own.siteUrl).replace(/\/$/, '')
        const target = String(path).replace(/^\//, '').replace('@current', String(own.teamId))
        // PostHog's server puts `data` in the query for GET only (DELETE sends none).
        const params = method === 'GET' ? { ...(opts.data || {}), token: projectApiKey } : { token: projectApiKey }
        const url = `${base}/${target}${target.includes('?') ? '&' : '?'}${query(params)}`
        const headers = { Authorization: `Bearer ${personalApiKey}` }
        if (method === 'POST' || method === 'PATCH') {
            headers['Content-Type'] = 'application/json'
        }
        Object.assign(headers, opts.headers || {})
        const body = method === 'GET' || method === 'DELETE' ? undefined : JSON.stringify(opts.data || {})
        return load('fetch')(url, { method, headers, body })
    }
    return {
        get: (path, options) => request('GET', path, options),
        post: (path, options) => request('POST', path, options),
        put: (path, options) => request('PUT', path, options),
        patch: (path, options) => request('PATCH', path, options),
        delete: (path, options) => request('DELETE', path, options),
    }
})
