// `console.*`: each call becomes one plugin log entry, its arguments joined as Node prints them.
(function (host) {
    'use strict'
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
    return {
        debug: logger('DEBUG'),
        log: logger('LOG'),
        info: logger('INFO'),
        warn: logger('WARN'),
        error: logger('ERROR'),
    }
})
