//! What the client commands do differently when the server is a cluster member
//! (`tcpnetlock server --etcd`).
//!
//! A member can be frozen (SIGSTOP, a paused VM) while etcd hands its locks to others; it then
//! cannot close its clients' connections. A client that holds with a lease (`ttl:`) is safe
//! anyway: it counts the lock as lost by its own clock once renewals go unanswered, and a member
//! answers only while its etcd lease outlives the client's deadline. That works for a client
//! ttl up to the member's bound (`.info`: `max_ttl_secs`), so `do` and `lock` take that bound
//! as their ttl unless told otherwise, and refuse a longer `--ttl` before asking.

use std::time::Duration;

use super::output::printable;
use super::{EXIT_USAGE, Fail};
use tcpnetlock::client::{Client, LockBuilder};

/// `request` with the lease ttl to ask for: `asked` (`--ttl`), or for a cluster member without
/// `--ttl` the longest it vouches for. A server on its own, or one older than 0.3 (no `.info`),
/// gets what was asked. Bad arguments are found first, before the server is asked anything.
pub fn with_lease_ttl<'a>(
    request: LockBuilder<'a>,
    client: &Client,
    asked: Option<Duration>,
) -> Result<LockBuilder<'a>, Fail> {
    request.validate().map_err(|e| Fail::from_client(&e))?;
    Ok(match lease_ttl(client, asked)? {
        Some(ttl) => request.ttl(ttl),
        None => request,
    })
}

fn lease_ttl(client: &Client, asked: Option<Duration>) -> Result<Option<Duration>, Fail> {
    let info = client.info().map_err(|e| Fail::from_client(&e))?;
    let Some(bound) = info.and_then(|i| i.cluster).and_then(|c| c.max_ttl()) else {
        return Ok(asked);
    };
    match asked {
        None => Ok(Some(bound)),
        Some(ttl) if ttl <= bound => Ok(Some(ttl)),
        Some(ttl) => Err(Fail::new(
            EXIT_USAGE,
            &format!(
                "--ttl {} is longer than the cluster member at {} vouches for: at most {} s \
                 (its etcd lease could run out before this client counted the lock as lost); \
                 give a shorter --ttl, or none to use the longest",
                secs(ttl),
                printable(&client.server()),
                secs(bound)
            ),
        )),
    }
}

/// Seconds as a person types them: `2.733`, `30`.
fn secs(d: Duration) -> String {
    let text = format!("{:.3}", d.as_secs_f64());
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn seconds_read_as_typed() {
        use std::time::Duration;
        assert_eq!(super::secs(Duration::from_millis(2733)), "2.733");
        assert_eq!(super::secs(Duration::from_secs(30)), "30");
    }
}
