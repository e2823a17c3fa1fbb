//! The process's descriptor limit. Its own file because the benchmark, which opens as many
//! connections as the server it measures, mounts it too (benches/load/common.rs).

use log::debug;

/// Raises the soft descriptor limit to the hard one: each held lock is a descriptor, and the
/// usual soft limit of 1024 would cap the server far below `--max-connections`.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain struct in and out.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let old = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                debug!("raised the descriptor limit from {old} to {}", lim.rlim_max);
            }
        }
    }
}
