//! The walk over a leaf's heap blocks, as a plain value: which block range the next batch
//! statement scans. Pure arithmetic, tested with `cargo test` (no server).
//!
//! A leaf is walked in ranges of `step` blocks sized so that a range holds about two batches of
//! rows to do. The walk starts at a block derived from the backend's PID (so two sessions
//! rotating the same column start apart), goes to the end of the table as it was when the walk
//! started, and wraps around to the blocks before its start, so a walk ends: rows appended behind
//! it (the new versions of rows it updated among them) are the next pass's. (It never takes a
//! row twice: every row a statement locks is rotated, skipped, or left alone for the rest of the
//! pass: the caller's exclusion list.)

/// Where the walk of one leaf is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    /// Blocks per range.
    pub step: u32,
    /// The leaf's size in blocks when its walk started.
    pub blocks: u64,
    /// The block the walk started at.
    pub start: u32,
    /// The next block to scan.
    pub block: u32,
    /// Whether the walk has passed the end of the table and continues from block 0.
    pub wrapped: bool,
}

/// A range of blocks `[lo, hi)`, or `[lo, end of table)` when `hi` is None.
pub type Range = (u32, Option<u32>);

impl Walk {
    /// The walk of a leaf of `blocks` blocks holding `rows` rows to do, for batches of `batch`
    /// rows, by the backend with this `pid`.
    pub fn new(blocks: u64, rows: i64, batch: i64, pid: u32) -> Walk {
        let step = if rows <= 0 {
            u32::MAX / 2
        } else {
            // Twice the blocks that hold one batch on average: a batch usually starts in the
            // middle of a block (where the previous one stopped), and LIMIT ends the scan as soon
            // as the batch is full, so the slack costs nothing and saves a second statement.
            let per_block = (rows as f64 / blocks.max(1) as f64).max(1e-6);
            ((2.0 * batch as f64 / per_block).ceil() as u64).clamp(1, u64::from(u32::MAX / 2))
                as u32
        };
        // Only tables of more than a few ranges are worth starting apart.
        let start = if blocks > 4 * u64::from(step) {
            (u64::from(pid).wrapping_mul(2_654_435_761) % blocks) as u32
        } else {
            0
        };
        Walk {
            step,
            blocks,
            start,
            block: start,
            wrapped: false,
        }
    }

    /// The next range to scan, or None when the walk of the leaf is complete.
    pub fn next_range(&self) -> Option<Range> {
        let lo = self.block;
        let hi = lo.saturating_add(self.step);
        if self.wrapped {
            (lo < self.start).then(|| (lo, Some(hi.min(self.start))))
        } else {
            Some((lo, Some(hi.min(self.end()))))
        }
    }

    /// The block after the last one the walk covers (the table's size when it started).
    fn end(&self) -> u32 {
        u32::try_from(self.blocks).unwrap_or(u32::MAX)
    }

    /// Moves past `range` after a statement over it locked `locked` of the `wanted` rows, the
    /// last of them in block `last_block`.
    pub fn advance(&mut self, (lo, hi): Range, locked: i64, wanted: i64, last_block: u32) {
        self.block = if locked == wanted {
            // Full: the next statement starts at the block where this one stopped (rows are
            // taken in block order), so each statement scans only its own blocks.
            last_block.max(lo)
        } else {
            hi.unwrap_or(u32::MAX)
        };
        if !self.wrapped && self.block >= self.end() {
            // The end of the table: wrap around to the blocks before the starting point.
            self.wrapped = true;
            self.block = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every range a walk scans when no statement fills its batch.
    fn ranges(mut w: Walk) -> Vec<Range> {
        let mut out = Vec::new();
        while let Some(r) = w.next_range() {
            out.push(r);
            w.advance(r, 0, 1, 0);
            assert!(out.len() < 10_000, "the walk ends");
        }
        out
    }

    #[test]
    fn small_tables_start_at_zero_and_end_at_their_size() {
        let w = Walk::new(10, 1000, 500, 4242);
        assert_eq!((w.start, w.step), (0, 10));
        assert_eq!(ranges(w), vec![(0, Some(10))]);
    }

    #[test]
    fn ranges_hold_about_two_batches() {
        // 100 rows a block, batches of 500: 10 blocks a range.
        let w = Walk::new(1000, 100_000, 500, 0);
        assert_eq!(w.step, 10);
        let r = ranges(w);
        assert_eq!(r.len(), 100);
        assert_eq!(r[0], (0, Some(10)));
        assert_eq!(
            r[99],
            (990, Some(1000)),
            "the last range ends at the table's size"
        );
    }

    #[test]
    fn start_derives_from_the_pid_and_the_walk_wraps_around() {
        let w = Walk::new(1000, 100_000, 500, 77);
        assert_ne!(w.start, 0);
        assert_eq!(w.start, (77u64 * 2_654_435_761 % 1000) as u32);
        let r = ranges(w);
        // From the start to the end, then from 0 up to the start, every block exactly once.
        assert_eq!(r.first().unwrap().0, w.start);
        let wrap = r.iter().position(|&(lo, _)| lo == 0).unwrap();
        assert_eq!(r[wrap - 1].1, Some(1000), "then the end of the table");
        assert_eq!(
            r.last().unwrap().1,
            Some(w.start),
            "the wrapped part stops at the start"
        );
        let mut covered = vec![0u32; 1000];
        for &(lo, hi) in &r {
            for b in lo..hi.unwrap_or(1000) {
                covered[b as usize] += 1;
            }
        }
        assert!(covered.iter().all(|&c| c == 1), "each block once");
        // Two backends start apart.
        assert_ne!(Walk::new(1000, 100_000, 500, 78).start, w.start);
    }

    #[test]
    fn a_full_statement_continues_where_it_stopped() {
        let mut w = Walk::new(1000, 100_000, 500, 0);
        let r = w.next_range().unwrap();
        w.advance(r, 500, 500, 7);
        assert_eq!(w.block, 7);
        assert!(!w.wrapped);
        // A stale last block below the range never moves the walk backwards.
        let r = w.next_range().unwrap();
        w.advance(r, 500, 500, 3);
        assert_eq!(w.block, 7);
    }

    #[test]
    fn the_walk_never_goes_past_the_size_it_started_with() {
        // Blocks added behind it (new row versions, the application's inserts) are the next
        // pass's: a walk that followed them could chase its own updates for ever.
        let w = Walk::new(100, 10_000, 500, 0);
        assert!(ranges(w)
            .iter()
            .all(|&(_, hi)| hi.is_some_and(|hi| hi <= 100)));
        // A full statement whose last row is in the last block: the walk stays in the table.
        let mut w = Walk::new(100, 10_000, 500, 0);
        w.block = 95;
        let r = w.next_range().unwrap();
        assert_eq!(r, (95, Some(100)));
        w.advance(r, 10, 500, 99);
        assert!(w.wrapped && w.next_range().is_none());
    }

    #[test]
    fn no_rows_to_do_means_one_range() {
        let w = Walk::new(5000, 0, 500, 99);
        assert_eq!(w.start, 0);
        assert_eq!(ranges(w), vec![(0, Some(5000))]);
        // An empty table: one empty range, and the walk ends.
        assert_eq!(ranges(Walk::new(0, 0, 500, 99)), vec![(0, Some(0))]);
    }
}
