//! Lookups/s through the two ways to reach the GeoIP database: a `Locate` round trip to the
//! actor per lookup, and a direct call on the shared `GeoIpHandle`. Each is run from 1 and 2
//! caller threads.
//!
//! Usage: `cargo run --release -p plugin-server-bench --bin geoip -- [MMDB_PATH] [LOOKUPS]`
//! (MMDB_PATH defaults to $GEOIP_TEST_MMDB, which `docker/fetch_geolite2.sh` prints; LOOKUPS to
//! 1,000,000 random IPv4 addresses). The allocator is the server's (budgeted mimalloc):
//! lookups allocate the whole JSON record.

use std::error::Error;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use actix::{Actor, Addr};
use plugin_server_actors::geoip::{
    DatabaseOrigin as GeoIpDatabaseOrigin, GeoIpActor, GeoIpConfig, GeoIpHandle, GeoIpSource,
    Locate,
};

#[global_allocator]
static ALLOCATOR: plugin_server_alloc::BudgetedAllocator<plugin_server_alloc::MiMalloc> =
    plugin_server_alloc::BudgetedAllocator(plugin_server_alloc::MiMalloc);

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .or_else(|| std::env::var("GEOIP_TEST_MMDB").ok())
        .map(PathBuf::from)
        .ok_or("give the .mmdb path as the first argument or in GEOIP_TEST_MMDB")?;
    let lookups: usize = args.next().map_or(Ok(1_000_000), |n| n.parse())?;
    let ips = random_ipv4(lookups, 0x5eed_1234_abcd_ef01);

    actix::System::new().block_on(async move {
        let handle = GeoIpHandle::new();
        let addr = GeoIpActor::new(
            GeoIpConfig {
                source: GeoIpSource::File(path),
                disabled: false,
                reload_check_interval: Duration::from_secs(3600),
            },
            handle.clone(),
        )
        .start();
        let started = Instant::now();
        while !handle.is_loaded() {
            if started.elapsed() > Duration::from_secs(60) {
                return Err("the database did not load within 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!(
            "database loaded in {:?}; {} random IPv4 lookups per run",
            started.elapsed(),
            ips.len()
        );

        // Warm-up, so the first measured run does not pay for page faults and caches.
        run_handle(&handle, &ips[..ips.len().min(100_000)], 1);

        if let Some(database) = handle.database()
            && let GeoIpDatabaseOrigin::File(path) = database.origin()
        {
            let reader = maxminddb::Reader::open_readfile(path)?;
            report(
                "baseline: maxminddb typed City decode, no JSON, 1 thread",
                run_typed_decode(&reader, &ips, 1),
            );
            report(
                "baseline: maxminddb typed City decode, no JSON, 2 threads",
                run_typed_decode(&reader, &ips, 2),
            );
        }
        report("shared handle, 1 thread", run_handle(&handle, &ips, 1));
        report("shared handle, 2 threads", run_handle(&handle, &ips, 2));
        report(
            "actor round trip, 1 caller task on the actor's arbiter",
            run_actor_same_arbiter(&addr, &ips).await,
        );
        report(
            "actor round trip, 1 caller thread",
            run_actor(&addr, &ips, 1).await?,
        );
        report(
            "actor round trip, 2 caller threads",
            run_actor(&addr, &ips, 2).await?,
        );
        Ok(())
    })
}

struct Run {
    lookups: usize,
    found: usize,
    took: Duration,
    /// CPU time of the whole process (all threads) during the run. On a shared machine wall
    /// time depends on what else runs; CPU per lookup much less so.
    cpu: Option<Duration>,
}

fn report(what: &str, run: Run) {
    let cpu_per_lookup = run.cpu.map_or_else(
        || "?".to_owned(),
        |cpu| format!("{:.2}", cpu.as_secs_f64() * 1e6 / run.lookups as f64),
    );
    println!(
        "{what:<58} {:>8.0} lookups/s  {cpu_per_lookup:>6} CPU µs/lookup  ({} lookups in {:.2?}, \
         {:.1}% found)",
        run.lookups as f64 / run.took.as_secs_f64(),
        run.lookups,
        run.took,
        100.0 * run.found as f64 / run.lookups as f64
    );
}

/// User + system CPU time of this process so far, from /proc/self/stat (Linux; 10 ms ticks).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name start at field 3; utime and stime are 14, 15.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // USER_HZ is 100 on every Linux architecture this runs on.
    Some(Duration::from_millis((utime + stime) * 10))
}

/// Times `work` in wall and process CPU time.
fn measure(lookups: usize, work: impl FnOnce() -> usize) -> Run {
    let cpu_before = process_cpu();
    let started = Instant::now();
    let found = work();
    let took = started.elapsed();
    let cpu = process_cpu()
        .zip(cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    Run {
        lookups,
        found,
        took,
        cpu,
    }
}

/// What the crate's own typed decoder costs, for scale: `locate` also builds the JSON.
fn run_typed_decode(reader: &maxminddb::Reader<Vec<u8>>, ips: &[String], threads: usize) -> Run {
    run_threads(ips, threads, |chunk| {
        chunk
            .iter()
            .filter(|ip| {
                ip.parse::<std::net::IpAddr>()
                    .ok()
                    .and_then(|address| reader.lookup(address).ok())
                    .and_then(|result| result.decode::<maxminddb::geoip2::City>().ok().flatten())
                    .is_some()
            })
            .count()
    })
}

/// Splits `ips` over `threads` scoped threads running `work` and times them all.
fn run_threads(ips: &[String], threads: usize, work: impl Fn(&[String]) -> usize + Sync) -> Run {
    measure(ips.len(), || {
        std::thread::scope(|scope| {
            let workers: Vec<_> = ips
                .chunks(ips.len().div_ceil(threads))
                .map(|chunk| scope.spawn(|| work(chunk)))
                .collect();
            workers
                .into_iter()
                .map(|worker| worker.join().unwrap_or(0))
                .sum()
        })
    })
}

/// Plugin VM threads are plain OS threads calling the handle directly.
fn run_handle(handle: &GeoIpHandle, ips: &[String], threads: usize) -> Run {
    run_threads(ips, threads, |chunk| {
        let handle = handle.clone();
        chunk
            .iter()
            .filter(|ip| handle.locate(ip).is_some())
            .count()
    })
}

async fn run_actor_same_arbiter(addr: &Addr<GeoIpActor>, ips: &[String]) -> Run {
    let cpu_before = process_cpu();
    let started = Instant::now();
    let mut found = 0;
    for ip in ips {
        if let Ok(Some(_)) = addr.send(Locate { ip: ip.clone() }).await {
            found += 1;
        }
    }
    let took = started.elapsed();
    Run {
        lookups: ips.len(),
        found,
        took,
        cpu: process_cpu()
            .zip(cpu_before)
            .map(|(after, before)| after.saturating_sub(before)),
    }
}

/// Caller OS threads, each blocking on one `send` at a time (as a VM thread would), while the
/// actor runs on the system arbiter (this thread).
async fn run_actor(
    addr: &Addr<GeoIpActor>,
    ips: &[String],
    threads: usize,
) -> Result<Run, Box<dyn Error>> {
    let chunks: Vec<Vec<String>> = ips
        .chunks(ips.len().div_ceil(threads))
        .map(<[String]>::to_vec)
        .collect();
    let cpu_before = process_cpu();
    let started = Instant::now();
    let mut done = Vec::new();
    for chunk in chunks {
        let addr = addr.clone();
        let (sender, receiver) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let found = tokio::runtime::Builder::new_current_thread()
                .build()
                .map(|runtime| {
                    runtime.block_on(async {
                        let mut found = 0;
                        for ip in chunk {
                            if let Ok(Some(_)) = addr.send(Locate { ip }).await {
                                found += 1;
                            }
                        }
                        found
                    })
                });
            // The receiver only goes away if the benchmark itself is gone.
            let _ = sender.send(found);
        });
        done.push(receiver);
    }
    let mut found = 0;
    for receiver in done {
        found += receiver.await??;
    }
    let took = started.elapsed();
    Ok(Run {
        lookups: ips.len(),
        found,
        took,
        cpu: process_cpu()
            .zip(cpu_before)
            .map(|(after, before)| after.saturating_sub(before)),
    })
}

/// Uniformly random IPv4 addresses (xorshift64*), formatted up front so formatting is not timed.
fn random_ipv4(count: usize, mut state: u64) -> Vec<String> {
    (0..count)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let bits = (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32;
            std::net::Ipv4Addr::from(bits).to_string()
        })
        .collect()
}
