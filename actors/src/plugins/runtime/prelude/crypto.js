// The `crypto` module: Node's Hash and Hmac (the input is kept until digest(), which hashes it
// natively; `key` is null for a plain hash) and randomUUID.
(function (host, load) {
    'use strict'
    function hasher(algorithm, key) {
        const parts = []
        return {
            update(data) {
                parts.push(typeof data === 'string' ? data : new Uint8Array(data))
                return this
            },
            digest(encoding) {
                const Buffer = load('buffer')
                const bytes = new Buffer(host.hash(String(algorithm), parts, key))
                return encoding === undefined ? bytes : bytes.toString(encoding)
            },
        }
    }
    return {
        createHash: (algorithm) => hasher(algorithm, null),
        createHmac: (algorithm, key) => hasher(algorithm, key),
        randomUUID: () => host.randomUUID(),
    }
})
