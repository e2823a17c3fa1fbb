//! This member's copy of the cluster's lock keys: every name's requests in create-revision
//! order, as of one etcd revision.
//!
//! Filled from one range read, then kept current by one prefix watch whose events are applied in
//! revision order. It answers the questions that need the whole cluster: which of this member's
//! waiters the queue rule now counts among the holders, `.locks`, and the global counts. Pure:
//! no etcd calls, no clock of its own (callers pass the wall clock for `.locks`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use super::keys::{Layout, Value};
use crate::table::queue::{self, Entry};
use crate::table::{HolderInfo, LockInfo, WaiterInfo};

/// One key as the mirror keeps it.
#[derive(Debug, Clone)]
pub struct Key {
    pub key: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub value: Value,
}

#[derive(Debug, Default)]
pub struct Mirror {
    /// Name → its keys by create revision.
    names: HashMap<Box<str>, BTreeMap<i64, Key>>,
    /// Key → (name, create revision), to apply deletions.
    index: HashMap<Vec<u8>, (Box<str>, i64)>,
    /// Every change up to this revision is applied.
    pub revision: i64,
}

/// Global counts, as `cluster()` reports them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub held: u64,
    pub holders: u64,
    pub waiting: u64,
}

impl Mirror {
    pub fn new(revision: i64) -> Mirror {
        Mirror {
            revision,
            ..Mirror::default()
        }
    }

    /// A key was written (created, or its value replaced). Returns the name it belongs to, or
    /// None for a key that is no lock request.
    pub fn put(&mut self, layout: &Layout, kv: Key) -> Option<Box<str>> {
        self.revision = self.revision.max(kv.mod_revision);
        let name: Box<str> = layout.parse(&kv.key)?.name.into();
        if let Some((_, old)) = self.index.get(&kv.key)
            && *old != kv.create_revision
        {
            // Deleted and created again while we were not looking: the old one is gone.
            let old = *old;
            self.remove_at(&name, old);
        }
        self.index
            .insert(kv.key.clone(), (name.clone(), kv.create_revision));
        self.names
            .entry(name.clone())
            .or_default()
            .insert(kv.create_revision, kv);
        Some(name)
    }

    /// A key was deleted at `revision`. Returns its name if the mirror had it.
    pub fn delete(&mut self, key: &[u8], revision: i64) -> Option<Box<str>> {
        self.revision = self.revision.max(revision);
        let (name, create) = self.index.remove(key)?;
        self.remove_at(&name, create);
        Some(name)
    }

    fn remove_at(&mut self, name: &str, create: i64) {
        if let Some(keys) = self.names.get_mut(name) {
            keys.remove(&create);
            if keys.is_empty() {
                self.names.remove(name);
            }
        }
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        self.index.contains_key(key)
    }

    /// A name's keys in create-revision order.
    pub fn keys(&self, name: &str) -> impl Iterator<Item = &Key> {
        self.names.get(name).into_iter().flat_map(|k| k.values())
    }

    /// The keys of `name` the queue rule counts among its holders.
    pub fn holders(&self, name: &str) -> impl Iterator<Item = &Key> {
        let n = queue::holders(self.keys(name).map(|k| k.value.entry()));
        self.keys(name).take(n)
    }

    /// Every key, for a sweep of this member's own.
    pub fn all_keys(&self) -> impl Iterator<Item = &Key> {
        self.names.values().flat_map(|k| k.values())
    }

    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for keys in self.names.values() {
            let n = queue::holders(keys.values().map(|k| k.value.entry())) as u64;
            t.held += u64::from(n > 0);
            t.holders += n;
            t.waiting += keys.len() as u64 - n;
        }
        t
    }

    /// Every held name with its holders and waiters, unsorted (see
    /// [`crate::table::sort_snapshot`]). `now_ms`: the wall clock; `offset`: the token offset.
    pub fn snapshot(&self, now_ms: u64, offset: u64) -> Vec<LockInfo> {
        let ms = |from: u64, to: u64| Duration::from_millis(to.saturating_sub(from));
        let text = |s: &Option<String>| s.as_deref().map(Arc::<str>::from);
        let mut locks = Vec::new();
        for (name, keys) in &self.names {
            let entries: Vec<Entry> = keys.values().map(|k| k.value.entry()).collect();
            let n = queue::holders(entries.iter().copied());
            let Some(head) = entries.first() else {
                continue;
            };
            let mut lock = LockInfo {
                name: Arc::from(&**name),
                max: head.max,
                holders: Vec::with_capacity(n),
                waiters: Vec::with_capacity(keys.len() - n),
            };
            for (i, k) in keys.values().enumerate() {
                let v = &k.value;
                let peer = v.peer.as_deref().and_then(|p| p.parse().ok());
                if i < n {
                    let since = v.granted_unix_ms.unwrap_or(v.asked_unix_ms);
                    lock.holders.push(HolderInfo {
                        client_id: text(&v.client_id),
                        peer,
                        held_for: ms(since, now_ms),
                        token: offset.saturating_add(k.mod_revision.max(0) as u64),
                        ttl: v.ttl_secs.and_then(|s| Duration::try_from_secs_f64(s).ok()),
                        shared: v.shared,
                        server: text(&v.server),
                    });
                } else {
                    lock.waiters.push(WaiterInfo {
                        client_id: text(&v.client_id),
                        peer,
                        waited: ms(v.asked_unix_ms, now_ms),
                        left: v
                            .wait_until_unix_ms
                            .map_or(Duration::ZERO, |until| ms(now_ms, until)),
                        shared: v.shared,
                        server: text(&v.server),
                    });
                }
            }
            locks.push(lock);
        }
        locks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(layout: &Layout, name: &str, conn: u64, create: i64, max: u32, shared: bool) -> Key {
        Key {
            key: layout
                .key(name, 0xab, crate::table::ConnId(conn))
                .into_bytes(),
            create_revision: create,
            mod_revision: create,
            value: Value {
                max,
                shared,
                server: Some("tnl-a".into()),
                asked_unix_ms: 1000,
                wait_until_unix_ms: Some(9000),
                ..Value::default()
            },
        }
    }

    #[test]
    fn puts_and_deletes_in_revision_order() {
        let layout = Layout::new("/t/");
        let mut m = Mirror::new(10);
        for (conn, create) in [(1, 11), (2, 12), (3, 13)] {
            let name = m.put(&layout, kv(&layout, "a", conn, create, 1, false));
            assert_eq!(name.as_deref(), Some("a"));
        }
        assert_eq!(m.revision, 13);
        let holders: Vec<i64> = m.holders("a").map(|k| k.create_revision).collect();
        assert_eq!(holders, [11]);
        let first = kv(&layout, "a", 1, 11, 1, false).key;
        assert_eq!(m.delete(&first, 14).as_deref(), Some("a"));
        let holders: Vec<i64> = m.holders("a").map(|k| k.create_revision).collect();
        assert_eq!(holders, [12]);
        assert_eq!(
            m.totals(),
            Totals {
                held: 1,
                holders: 1,
                waiting: 1
            }
        );
        // A value replaced keeps the key's place.
        let mut granted = kv(&layout, "a", 3, 13, 1, false);
        granted.mod_revision = 15;
        m.put(&layout, granted);
        let order: Vec<i64> = m.keys("a").map(|k| k.create_revision).collect();
        assert_eq!(order, [12, 13]);
        // Not a lock key: ignored.
        let mut foreign = kv(&layout, "a", 4, 16, 1, false);
        foreign.key = b"/t/locks/a".to_vec();
        assert_eq!(m.put(&layout, foreign), None);
        assert_eq!(m.delete(b"/t/locks/none/ab/1", 17), None);
        assert_eq!(m.revision, 17);
    }

    #[test]
    fn snapshot_shows_holders_and_waiters_with_their_server() {
        let layout = Layout::new("/t/");
        let mut m = Mirror::new(0);
        m.put(&layout, kv(&layout, "s", 1, 5, 1, true));
        m.put(&layout, kv(&layout, "s", 2, 6, 1, true));
        m.put(&layout, kv(&layout, "s", 3, 7, 1, false));
        m.put(&layout, kv(&layout, "s", 4, 8, 1, true));
        let snap = m.snapshot(4000, 1_000_000);
        assert_eq!(snap.len(), 1);
        let lock = &snap[0];
        assert_eq!(lock.holders.len(), 2);
        assert_eq!(lock.waiters.len(), 2);
        assert_eq!(lock.holders[0].token, 1_000_005);
        assert_eq!(lock.holders[0].held_for, Duration::from_secs(3));
        assert_eq!(lock.holders[0].server.as_deref(), Some("tnl-a"));
        assert_eq!(lock.waiters[0].left, Duration::from_secs(5));
        assert!(!lock.waiters[0].shared);
    }
}
