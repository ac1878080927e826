//! A peer's whole topic set and file list, sent in chunks after each (re)registration, so
//! that no message grows with the size of what a peer holds. Chunks of one generation add
//! (each all or nothing, as an announce without `replace`); the last one removes whatever
//! the peer held that no chunk of the generation named, which is what one `replace` did.

use std::collections::BTreeSet;

use peerbus_proto::{PeerAuth, WireError};

use super::{Change, FileDiff, FileSet, Registry, TopicDiff, TopicSet};

/// What one peer has named so far in its current sync pass. In memory only: a pass cut
/// short by an index restart is started again by the peer when it registers again.
#[derive(Debug, Default)]
pub(crate) struct Pass {
    generation: u64,
    named: BTreeSet<String>,
}

impl Pass {
    /// Starts over when `generation` is new, then remembers `names`.
    fn note(pass: &mut Option<Pass>, generation: u64, names: impl Iterator<Item = String>) {
        let p = pass.get_or_insert_with(Pass::default);
        if p.generation != generation {
            *p = Pass {
                generation,
                named: BTreeSet::new(),
            };
        }
        p.named.extend(names);
    }
}

impl Registry {
    /// One chunk of `auth`'s topic set (see [`peerbus_proto::Request::SyncTopics`]).
    pub fn sync_topics(
        &mut self,
        auth: &PeerAuth,
        generation: u64,
        topics: &TopicSet,
        last: bool,
    ) -> Result<(TopicDiff, Vec<Change>), WireError> {
        let (mut diff, mut changes) = self.announce(auth, topics, false)?;
        let pass = self.syncs.entry(auth.peer_id).or_default();
        Pass::note(&mut pass.topics, generation, topics.0.iter().cloned());
        if last {
            let named = pass.topics.take().map(|p| p.named).unwrap_or_default();
            let stale: Vec<String> = self
                .peers
                .get(&auth.peer_id)
                .map(|p| p.topics.difference(&named).cloned().collect())
                .unwrap_or_default();
            let (gone, more) = self.withdraw(auth, &stale)?;
            diff.removed = gone.removed;
            changes.extend(more);
        }
        Ok((diff, changes))
    }

    /// One chunk of `auth`'s file list (see [`peerbus_proto::Request::SyncFiles`]).
    pub fn sync_files(
        &mut self,
        auth: &PeerAuth,
        generation: u64,
        files: &FileSet,
        last: bool,
    ) -> Result<(FileDiff, Vec<Change>), WireError> {
        let (mut diff, mut changes) = self.register_files(auth, files, false)?;
        let pass = self.syncs.entry(auth.peer_id).or_default();
        Pass::note(
            &mut pass.files,
            generation,
            files.0.iter().map(|f| f.hash.clone()),
        );
        if last {
            let named = pass.files.take().map(|p| p.named).unwrap_or_default();
            let stale: Vec<String> = self
                .peers
                .get(&auth.peer_id)
                .map(|p| p.files.difference(&named).cloned().collect())
                .unwrap_or_default();
            let (gone, more) = self.unregister_files(auth, &stale)?;
            diff.removed = gone.removed;
            diff.total = gone.total;
            changes.extend(more);
        }
        Ok((diff, changes))
    }
}

/// A peer's passes under way.
#[derive(Debug, Default)]
pub(crate) struct Passes {
    topics: Option<Pass>,
    files: Option<Pass>,
}

#[cfg(test)]
mod tests {
    use super::super::tests::{T0, TTL, register, set};
    use super::*;
    use peerbus_proto::FileEntry;

    fn names(reg: &Registry) -> Vec<String> {
        reg.list_topics(None, None)
            .into_iter()
            .map(|l| l.topic)
            .collect()
    }

    #[test]
    fn chunks_add_and_the_last_withdraws_what_no_chunk_named() {
        let mut reg = Registry::new(TTL);
        let a = register(&mut reg, "a", T0);
        reg.announce(&a, &set(&["old", "kept"]), false).unwrap();
        reg.sync_topics(&a, 7, &set(&["kept", "new1"]), false)
            .unwrap();
        // Until the pass ends nothing is withdrawn.
        assert_eq!(names(&reg), ["kept", "new1", "old"]);
        let (diff, _) = reg.sync_topics(&a, 7, &set(&["new2"]), true).unwrap();
        assert_eq!(diff.removed, ["old"]);
        assert_eq!(names(&reg), ["kept", "new1", "new2"]);
        // A new generation starts over: what the cut-short pass named does not count.
        reg.sync_topics(&a, 8, &set(&["new1"]), false).unwrap();
        reg.sync_topics(&a, 9, &set(&["kept"]), true).unwrap();
        assert_eq!(names(&reg), ["kept"]);
    }

    #[test]
    fn a_conflicting_chunk_changes_nothing() {
        let mut reg = Registry::new(TTL);
        let a = register(&mut reg, "a", T0);
        let b = register(&mut reg, "b", T0);
        reg.announce(&b, &set(&["taken"]), false).unwrap();
        let e = reg
            .sync_topics(&a, 1, &set(&["mine", "taken"]), false)
            .unwrap_err();
        assert_eq!(e.message, "topic 'taken' exists on peer b");
        reg.sync_topics(&a, 1, &set(&["mine"]), true).unwrap();
        assert_eq!(names(&reg), ["mine", "taken"]);
    }

    #[test]
    fn file_chunks_replace_the_list_when_the_pass_ends() {
        let mut reg = Registry::new(TTL);
        let a = register(&mut reg, "a", T0);
        let file = |c: char| FileEntry {
            name: format!("{c}.bin"),
            hash: c.to_string().repeat(64),
            size: 1,
        };
        let files = |v: Vec<FileEntry>| FileSet::new(v).unwrap();
        reg.register_files(&a, &files(vec![file('a'), file('b')]), false)
            .unwrap();
        reg.sync_files(&a, 3, &files(vec![file('b')]), false)
            .unwrap();
        let (diff, _) = reg
            .sync_files(&a, 3, &files(vec![file('c')]), true)
            .unwrap();
        assert_eq!((diff.removed, diff.total), (1, 2));
        let listed: Vec<String> = reg
            .search_files("", None)
            .into_iter()
            .map(|h| h.name)
            .collect();
        assert_eq!(listed.len(), 2);
        assert!(!listed.contains(&"a.bin".to_string()), "{listed:?}");
    }
}
