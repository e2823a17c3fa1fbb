//! Exercises the etcd client (src/etcd/) against a live etcd and prints what it measured:
//!
//!     cargo run --features etcd --example etcd-probe -- http://127.0.0.1:2379[,URL...]
//!         [--cacert FILE] [--cert FILE --key FILE] [--user NAME --password PW]
//!
//! It writes and deletes keys under `/tcpnetlock-probe/` only. Until the server mounts the
//! module (issue 13), this is also the yardstick for the binary-size budget of the backend.

#[path = "../src/etcd/mod.rs"]
#[allow(dead_code, unused_imports)]
mod etcd;

use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use etcd::{
    Compare, CompareOp, DeleteRequest, EtcdClient, EtcdConfig, EtcdError, Op, PutRequest,
    RangeRequest, SortOrder, SortTarget, Txn, WatchMessage, WatchRequest,
};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("etcd-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let endpoints = args.next().ok_or(
        "usage: etcd-probe URL[,URL...] [--cacert F] [--cert F --key F] [--user U --password P]",
    )?;
    let mut config = EtcdConfig::new(endpoints.split(','));
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--cacert" => config.ca_file = Some(value.into()),
            "--cert" => config.cert_file = Some(value.into()),
            "--key" => config.key_file = Some(value.into()),
            "--user" => config.user = Some(value),
            "--password" => config.password = Some(value),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    let client = EtcdClient::new(config).map_err(|e| e.to_string())?;
    let soon = || Instant::now() + Duration::from_secs(5);
    let e = |e: EtcdError| e.to_string();

    for member in client.member_list(soon()).map_err(e)? {
        println!(
            "member {:x} {} {:?}",
            member.id, member.name, member.client_urls
        );
    }
    for (i, endpoint) in client.endpoints().iter().enumerate() {
        match client.status(i, soon()) {
            Ok(s) => println!(
                "{endpoint}: etcd {} member {:x} leader {:x} term {}",
                s.version, s.header.member_id, s.leader, s.raft_term
            ),
            Err(err) => println!("{endpoint}: {err}"),
        }
    }

    let lease = client.lease_grant(5, soon()).map_err(e)?;
    let key = b"/tcpnetlock-probe/key".to_vec();
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([Op::Put(
            PutRequest::new(key.clone(), "probe").lease(lease.id),
        )])
        .or_else([Op::Range(RangeRequest::key(key.clone()))]);
    let put = client.txn(&txn, soon()).map_err(e)?;
    println!(
        "guarded put succeeded={} revision {}",
        put.succeeded, put.header.revision
    );
    let range = RangeRequest::prefix("/tcpnetlock-probe/")
        .sort(SortTarget::CreateRevision, SortOrder::Ascend);
    let read = client.range(&range, soon()).map_err(e)?;
    println!(
        "range: {} key(s) at revision {}",
        read.count, read.header.revision
    );

    let mut renewals = Vec::new();
    for _ in 0..20 {
        let sent = Instant::now();
        client.lease_keep_alive(lease.id, soon()).map_err(e)?;
        renewals.push(sent.elapsed());
    }
    renewals.sort();
    println!(
        "lease keepalive: median {:?}, max {:?}",
        renewals[renewals.len() / 2],
        renewals[renewals.len() - 1]
    );

    let (tx, rx) = mpsc::channel();
    let watch = client
        .watch(
            WatchRequest::key(key.clone()).start_revision(read.header.revision + 1),
            soon(),
            move |m| {
                let _ = tx.send((Instant::now(), m));
            },
        )
        .map_err(e)?;
    let sent = Instant::now();
    client.delete(&DeleteRequest::key(key), soon()).map_err(e)?;
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok((at, WatchMessage::Events { .. })) => {
            println!("watch saw the delete {:?} after it was sent", at - sent)
        }
        other => println!("watch: {other:?}"),
    }
    watch.cancel();
    client.lease_revoke(lease.id, soon()).map_err(e)?;
    Ok(())
}
