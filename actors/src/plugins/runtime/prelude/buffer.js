// Node's Buffer, as far as plugins use it: attachments' `contents` and `digest()` results.
// It is a Uint8Array (indexable, mutable) whose toString decodes, so `JSON.parse(contents)`
// and `contents.toString()` give the text.
(function (host) {
    'use strict'
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
    return Buffer
})
