//! Where a data stream continues after an elastic restart: the saved ranks' cursors are positions in
//! their own file orders, which mean nothing in the new world's partition, so the new rank's cursor is
//! re-derived from what the saved ranks had read of the same epoch, file by file.
//!
//! Semantics (continue the saved epoch, lose nothing): the stream resumes in the earliest epoch E any
//! saved rank was in. A file of E is *read* when a saved rank at E had passed it (or it belonged to a
//! saved rank already past E), *partly read* up to the saved line when a saved rank at E was inside it,
//! and *unread* otherwise. The new rank starts at the first file of its own order of E that is not
//! read (mid-file at the saved line and byte when partly read) and from there reads on as usual. A
//! stream has one cursor, so files after that point are read whether or not a saved rank had read
//! them: every line unread at the checkpoint is still read in E (nothing is lost), and some lines
//! already read in E may be read a second time (at most what the saved ranks had read of E, plus
//! what ranks already past E had read of E + 1, which E + 1 reads again).

use std::collections::{HashMap, HashSet};

use xvlm_model::data::shard::Cursor;

/// Where one saved rank left a stream.
#[derive(Debug, Clone, Copy)]
pub struct SavedStream<'a> {
    /// The cursor of the next line it would have read.
    pub cursor: Cursor,
    /// The files of `cursor.epoch` in its reading order (by name).
    pub order: &'a [String],
}

/// The cursor from which a rank continues the stream the saved ranks left at `saved`; `order(e)` is
/// the new rank's files of epoch `e` in reading order (by the same names as the saved orders).
pub fn continue_stream(saved: &[SavedStream<'_>], order: impl Fn(u64) -> Vec<String>) -> Cursor {
    let Some(epoch) = saved.iter().map(|s| s.cursor.epoch).min() else {
        return Cursor::default();
    };
    let ahead = saved.iter().any(|s| s.cursor.epoch > epoch);
    let mut read: HashSet<&str> = HashSet::new();
    let mut partly: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut unread: HashSet<&str> = HashSet::new();
    for s in saved.iter().filter(|s| s.cursor.epoch == epoch) {
        for (i, name) in s.order.iter().enumerate() {
            if i < s.cursor.file {
                read.insert(name);
            } else if i == s.cursor.file && s.cursor.line > 0 {
                partly.insert(name, (s.cursor.line, s.cursor.byte));
            } else {
                unread.insert(name);
            }
        }
    }
    for (file, name) in order(epoch).iter().enumerate() {
        let name = name.as_str();
        if read.contains(name) {
            continue;
        }
        if let Some(&(line, byte)) = partly.get(name) {
            return Cursor {
                epoch,
                file,
                line,
                byte,
            };
        }
        // A file no saved rank at E lists was read by a rank already past E; with every saved rank at
        // E it is a file they did not have, so it is unread.
        if unread.contains(name) || !ahead {
            return Cursor {
                epoch,
                file,
                ..Cursor::default()
            };
        }
    }
    Cursor {
        epoch: epoch + 1,
        ..Cursor::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Lines per file of the simulated job (file i has `LINES[i]` lines, byte offset = 10 x line).
    const LINES: [u64; 7] = [5, 3, 8, 1, 4, 6, 2];

    fn name(i: usize) -> String {
        format!("part-{i}")
    }

    /// The job's file order of `epoch` (a rotation, different per epoch) cut into `world` slices.
    fn slice(epoch: u64, rank: usize, world: usize) -> Vec<String> {
        let n = LINES.len();
        let order: Vec<usize> = (0..n).map(|i| (i + 3 * epoch as usize) % n).collect();
        order[n * rank / world..n * (rank + 1) / world]
            .iter()
            .map(|&i| name(i))
            .collect()
    }

    fn lines_of(file: &str) -> u64 {
        LINES[file["part-".len()..].parse::<usize>().unwrap()]
    }

    /// Lines of `epoch` a rank reads from `cursor` to the end of its slice (none when the cursor is in
    /// another epoch).
    fn reads(cursor: Cursor, order: &[String], epoch: u64) -> BTreeSet<(String, u64)> {
        if cursor.epoch != epoch {
            return BTreeSet::new();
        }
        order
            .iter()
            .enumerate()
            .skip(cursor.file)
            .flat_map(|(i, f)| {
                let from = if i == cursor.file { cursor.line } else { 0 };
                (from..lines_of(f)).map(move |l| (f.clone(), l))
            })
            .collect()
    }

    /// Every line of `epoch` minus what saved ranks with `cursors` (one per rank of their world) read.
    fn unread(cursors: &[Cursor], epoch: u64) -> BTreeSet<(String, u64)> {
        let world = cursors.len();
        (0..world)
            .flat_map(|r| {
                let order = slice(epoch, r, world);
                let c = cursors[r];
                if c.epoch > epoch {
                    BTreeSet::new()
                } else {
                    reads(c, &order, epoch)
                }
            })
            .collect()
    }

    fn derive(cursors: &[Cursor], world: usize) -> Vec<Cursor> {
        let orders: Vec<Vec<String>> = cursors
            .iter()
            .enumerate()
            .map(|(r, c)| slice(c.epoch, r, cursors.len()))
            .collect();
        let saved: Vec<SavedStream<'_>> = cursors
            .iter()
            .zip(&orders)
            .map(|(&cursor, order)| SavedStream { cursor, order })
            .collect();
        (0..world)
            .map(|r| continue_stream(&saved, |e| slice(e, r, world)))
            .collect()
    }

    fn at(epoch: u64, file: usize, line: u64) -> Cursor {
        Cursor {
            epoch,
            file,
            line,
            byte: 10 * line,
        }
    }

    /// Whatever the saved and new worlds and however far the saved ranks got, the new ranks read every
    /// line the saved ranks had not read in the epoch the stream resumes in.
    #[test]
    fn no_unread_line_is_lost() {
        let cases: Vec<Vec<Cursor>> = vec![
            vec![at(2, 1, 2), at(2, 2, 0)],
            vec![at(2, 0, 0), at(2, 3, 1)],
            vec![at(2, 1, 1), at(3, 0, 2)],
            vec![at(1, 4, 0), at(1, 1, 1), at(2, 1, 0)],
            vec![at(0, 3, 1)],
            vec![at(4, 7, 0)],
        ];
        for saved in &cases {
            let epoch = saved.iter().map(|c| c.epoch).min().unwrap();
            let missing = unread(saved, epoch);
            for world in 1..=4 {
                let cursors = derive(saved, world);
                let read: BTreeSet<_> = cursors
                    .iter()
                    .enumerate()
                    .flat_map(|(r, &c)| reads(c, &slice(epoch, r, world), epoch))
                    .collect();
                let lost: Vec<_> = missing.difference(&read).collect();
                assert!(
                    lost.is_empty(),
                    "{saved:?} -> world {world} ({cursors:?}) loses {lost:?}"
                );
            }
        }
    }

    /// Shrinking 2 -> 1: the single rank's order is rank 0's files then rank 1's, so it continues
    /// inside rank 0's file at the saved line and byte.
    #[test]
    fn shrink_continues_inside_the_first_partly_read_file() {
        let cursors = derive(&[at(2, 1, 2), at(2, 2, 0)], 1);
        assert_eq!(cursors, vec![at(2, 1, 2)]);
    }

    /// Growing 1 -> 2: rank 0's half was read past, rank 1 continues where the saved rank was.
    #[test]
    fn growth_skips_read_files() {
        // The saved rank read the first 5 of 7 files and 1 line of the 6th.
        let cursors = derive(&[at(1, 5, 1)], 2);
        assert_eq!(
            cursors[0],
            at(2, 0, 0),
            "rank 0's files of epoch 1 were all read"
        );
        assert_eq!(cursors[1], at(1, 2, 1));
    }

    /// A file read by a rank already past the epoch is not read again in it.
    #[test]
    fn files_of_ranks_past_the_epoch_count_as_read() {
        // Rank 1 finished epoch 2 (and started 3); rank 0 is at the end of its slice of epoch 2.
        let cursors = derive(&[at(2, 3, 0), at(3, 0, 2)], 1);
        assert_eq!(cursors, vec![at(3, 0, 0)]);
    }
}
