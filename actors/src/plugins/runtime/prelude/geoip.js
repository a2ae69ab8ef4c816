// PostHog's `meta.geoip`: a promise of geoip2-node's City, or null.
(function (host) {
    'use strict'
    return {
        async locate(ip) {
            return host.geoip(String(ip))
        },
    }
})
