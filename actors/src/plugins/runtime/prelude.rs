//! The JavaScript every plugin VM runs before the plugin: `prelude/core.js` at VM creation,
//! and the sections it compiles on first use (through the `host.section` native).

/// Run when a VM is built; evaluates to `function (host)`.
pub const CORE: &str = include_str!("prelude/core.js");

/// A section's source, by the name `core.js` loads it with; each evaluates to
/// `function (host, load)`.
pub fn section(name: &str) -> Option<&'static str> {
    Some(match name {
        "api" => include_str!("prelude/api.js"),
        "buffer" => include_str!("prelude/buffer.js"),
        "console" => include_str!("prelude/console.js"),
        "crypto" => include_str!("prelude/crypto.js"),
        "fetch" => include_str!("prelude/fetch.js"),
        "cache" => include_str!("prelude/cache.js"),
        "storage" => include_str!("prelude/storage.js"),
        "utils" => include_str!("prelude/utils.js"),
        "geoip" => include_str!("prelude/geoip.js"),
        "jobs" => include_str!("prelude/jobs.js"),
        _ => return None,
    })
}
