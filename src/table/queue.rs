//! Who holds a name when its requests are kept as one list in arrival order, and nothing else.
//!
//! The in-memory [`Table`](super::Table) keeps holders and a queue apart and moves a waiter from
//! one to the other when it is granted. A store shared by several servers (cluster mode: etcd)
//! cannot do that in one place: each server writes one entry per request, ordered by the store
//! (etcd's create revision), and every server must be able to tell, from that list alone and
//! without talking to the others, who holds. This is that rule:
//!
//! - the first entry's `max` is the name's; an entry with another `max` is refused by the server
//!   that wrote it (and removed), and until then it holds nothing and ends the run below;
//! - if the first entry is exclusive, the holders are the first `min(max, run)` entries, where
//!   `run` counts the consecutive exclusive entries from the head;
//! - if the first entry is shared, the holders are the run of consecutive shared entries from the
//!   head;
//! - everyone after the holders waits, in list order.
//!
//! That is the table's rule (no barging, readers granted together at the head, at most `max`
//! exclusive holders, FIFO), said as a function of the list: the unit test
//! `queue_rule_matches_the_model` and [`super::model::CheckQueue`] drive it against the table's
//! reference model on random histories.
//!
//! Two properties the cluster's safety rests on, both tested here:
//! - an entry that holds keeps holding while it stays in the list, whatever else is removed or
//!   appended (entries are only ever appended at the end), so a server may grant on what it saw
//!   at one revision;
//! - the holders never exceed `max` exclusive entries, or mix modes.

/// What one entry asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub max: u32,
    pub shared: bool,
}

/// Where an entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Holds,
    Waits,
    /// The name is held or awaited with another `max` (the first entry's).
    MaxMismatch {
        max: u32,
    },
}

/// How many entries at the head of `entries` (in arrival order) hold.
pub fn holders(entries: impl IntoIterator<Item = Entry>) -> usize {
    let mut entries = entries.into_iter();
    let Some(head) = entries.next() else {
        return 0;
    };
    let max = head.max.max(1);
    let same = |e: &Entry| e.shared == head.shared && e.max.max(1) == max;
    // Exclusive holders are at most `max`: no need to look further down a long queue (this
    // runs for every change a member sees).
    let most = if head.shared {
        usize::MAX
    } else {
        max as usize - 1
    };
    1 + entries.take(most).take_while(same).count()
}

/// Where the entry at `index` stands in `entries` (arrival order). `entries` may be cut short
/// after `index`: what comes later never changes the answer.
pub fn place(entries: &[Entry], index: usize) -> Place {
    let head = entries[0].max.max(1);
    if entries[index].max.max(1) != head {
        return Place::MaxMismatch { max: head };
    }
    if index < holders(entries[..=index].iter().copied()) {
        Place::Holds
    } else {
        Place::Waits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(max: u32) -> Entry {
        Entry { max, shared: false }
    }

    fn s() -> Entry {
        Entry {
            max: 1,
            shared: true,
        }
    }

    #[test]
    fn exclusive_heads_hold_up_to_max() {
        assert_eq!(holders([]), 0);
        assert_eq!(holders([x(1), x(1), x(1)]), 1);
        assert_eq!(holders([x(3), x(3)]), 2);
        assert_eq!(holders([x(3), x(3), x(3), x(3)]), 3);
        // A shared request behind an exclusive head waits, and so does everyone behind it.
        assert_eq!(holders([x(3), s(), x(3)]), 1);
        // max 0 is 1, as in the table.
        assert_eq!(holders([x(0), x(1)]), 1);
    }

    #[test]
    fn shared_heads_hold_together_until_an_exclusive_one() {
        assert_eq!(holders([s(), s(), s()]), 3);
        assert_eq!(holders([s(), x(1), s()]), 1);
        assert_eq!(holders([s(), s(), x(1), s()]), 2);
    }

    #[test]
    fn another_max_is_refused_and_holds_nothing() {
        let list = [x(2), x(3), x(2)];
        assert_eq!(place(&list, 0), Place::Holds);
        assert_eq!(place(&list, 1), Place::MaxMismatch { max: 2 });
        // Until it is removed, the refused entry ends the run: the one behind it waits.
        assert_eq!(place(&list, 2), Place::Waits);
        assert_eq!(holders(list), 1);
    }

    #[test]
    fn place_ignores_what_comes_later() {
        let list = [s(), s(), x(1), s()];
        assert_eq!(place(&list, 1), Place::Holds);
        assert_eq!(place(&list[..2], 1), Place::Holds);
        assert_eq!(place(&list, 3), Place::Waits);
    }

    /// Every list of up to 6 entries over a few kinds: the holders are within the rules, and an
    /// entry that holds still holds after any removal of others or any appending.
    #[test]
    fn a_holder_keeps_holding_and_the_rules_hold() {
        let kinds = [x(1), x(2), x(3), s()];
        let mut lists: Vec<Vec<Entry>> = vec![Vec::new()];
        for _ in 0..6 {
            let mut longer = Vec::new();
            for l in &lists {
                for k in kinds {
                    let mut n = l.clone();
                    n.push(k);
                    longer.push(n);
                }
            }
            lists.extend(longer.into_iter().filter(|l| l.len() <= 6));
            lists.sort_by_key(|l| l.len());
            lists.dedup();
        }
        assert!(lists.len() > 4000);
        for list in &lists {
            let n = holders(list.iter().copied());
            assert!(n <= list.len());
            if let Some(head) = list.first() {
                assert!(n >= 1, "the head always holds: {list:?}");
                let held = &list[..n];
                assert!(held.iter().all(|e| e.shared == head.shared));
                if !head.shared {
                    assert!(n <= head.max as usize);
                }
            }
            // Remove any one entry, or append any kind: the holders that remain still hold.
            for gone in 0..list.len() {
                let mut after: Vec<Entry> = list.clone();
                after.remove(gone);
                let m = holders(after.iter().copied());
                let still = (0..n).filter(|&i| i != gone).count();
                assert!(m >= still, "{list:?} without {gone}: {m} < {still}");
            }
            for k in kinds {
                let mut after = list.clone();
                after.push(k);
                assert!(holders(after.iter().copied()) >= n, "{list:?} + {k:?}");
            }
        }
    }
}
