//! Training data: plain-text files tokenized into fixed-length blocks, a held-out slice, and a
//! seeded shuffle that makes the batch of every step a pure function of (seed, step), so a
//! resumed run reads exactly the batches an uninterrupted one would.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use tokenizers::Tokenizer;

/// Tokenized text cut into blocks of `seq_len + 1` tokens (inputs and their next tokens).
#[derive(Debug, Clone)]
pub struct TokenBlocks {
    pub seq_len: usize,
    /// Blocks the optimizer sees, in text order (shuffled per epoch when sampled).
    pub train: Vec<Vec<u32>>,
    /// The last blocks of the text, never trained on; evaluated every N steps.
    pub heldout: Vec<Vec<u32>>,
    /// FNV-1a of every token, train then held-out: a resumed run checks it reads the same data.
    pub fingerprint: u64,
}

/// The files to read: each path given, or the `*.txt` files of a directory (sorted). WikiText-2
/// is refused: it is the test set.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut in_dir: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot list {}", p.display()))?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<_>>()?;
            in_dir.retain(|f| f.is_file() && f.extension().is_some_and(|e| e == "txt"));
            in_dir.sort();
            ensure!(!in_dir.is_empty(), "{} holds no .txt files", p.display());
            files.extend(in_dir);
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            bail!("training data {} does not exist", p.display());
        }
    }
    for f in &files {
        let lower = f.to_string_lossy().to_lowercase();
        if lower.contains("wikitext") || lower.contains("wiki.test") {
            bail!("{} looks like WikiText-2, the evaluation set: never train on it", f.display());
        }
    }
    Ok(files)
}

impl TokenBlocks {
    /// Tokenizes `files` (each followed by `eos` when given, so documents do not run together)
    /// into blocks of `seq_len + 1` tokens, dropping the incomplete tail; the last
    /// `heldout_blocks` blocks are the held-out slice.
    pub fn from_files(
        tokenizer: &Tokenizer,
        files: &[PathBuf],
        eos: Option<u32>,
        seq_len: usize,
        heldout_blocks: usize,
    ) -> Result<Self> {
        let mut ids = Vec::new();
        for f in files {
            ids.extend(tokenize_file(tokenizer, f)?);
            ids.extend(eos);
        }
        Self::from_tokens(&ids, seq_len, heldout_blocks)
    }

    pub fn from_tokens(ids: &[u32], seq_len: usize, heldout_blocks: usize) -> Result<Self> {
        ensure!(seq_len >= 1, "the sequence length must be at least 1");
        let mut blocks: Vec<Vec<u32>> = ids.chunks_exact(seq_len + 1).map(<[u32]>::to_vec).collect();
        ensure!(
            blocks.len() > heldout_blocks,
            "{} tokens make {} blocks of {} tokens: too few for {heldout_blocks} held-out blocks and any training",
            ids.len(),
            blocks.len(),
            seq_len + 1
        );
        let heldout = blocks.split_off(blocks.len() - heldout_blocks);
        let fingerprint = fnv1a(blocks.iter().chain(&heldout).flatten().copied());
        Ok(Self { seq_len, train: blocks, heldout, fingerprint })
    }

    /// The training blocks of step `step` (0-based), `batch` of them: sample `i = step·batch + k`
    /// is position `i mod n` of epoch `i / n`'s permutation (each epoch its own seeded shuffle).
    pub fn batch(&self, seed: u64, step: u64, batch: usize) -> Vec<&[u32]> {
        let n = self.train.len() as u64;
        let mut cached: Option<(u64, Vec<u32>)> = None;
        (0..batch as u64)
            .map(|k| {
                let i = step * batch as u64 + k;
                let (epoch, pos) = (i / n, (i % n) as usize);
                if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    cached = Some((epoch, permutation(self.train.len(), seed, epoch)));
                }
                self.train[cached.as_ref().unwrap().1[pos] as usize].as_slice()
            })
            .collect()
    }
}

fn tokenize_file(tokenizer: &Tokenizer, path: &Path) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    // Paragraph by paragraph: bounded tokenizer memory on long files.
    let mut ids = Vec::new();
    for chunk in text.split_inclusive("\n\n") {
        let enc =
            tokenizer.encode(chunk, false).map_err(|e| anyhow::anyhow!("{}: cannot tokenize: {e}", path.display()))?;
        ids.extend_from_slice(enc.get_ids());
    }
    Ok(ids)
}

/// A Fisher–Yates permutation of `0..n` from (seed, epoch), with splitmix64: the same on every
/// platform and version (no dependency on a crate's generator).
pub fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut next = splitmix64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03);
    let mut p: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        p.swap(i, j);
    }
    p
}

/// The splitmix64 generator from `state`: what every seeded draw of the crate uses (shuffles,
/// Hutchinson probes, random allocations), so results do not depend on a crate's generator.
pub fn splitmix64(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn fnv1a(ids: impl Iterator<Item = u32>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for id in ids {
        for b in id.to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_heldout_and_seeded_batches() {
        let ids: Vec<u32> = (0..100).collect();
        let d = TokenBlocks::from_tokens(&ids, 9, 2).unwrap();
        assert_eq!(d.train.len(), 8);
        assert_eq!(d.heldout, vec![(80..90).collect::<Vec<u32>>(), (90..100).collect()]);
        // Every epoch visits every training block once, in a seed-dependent order.
        let epoch: Vec<u32> = (0..4).flat_map(|s| d.batch(7, s, 2)).map(|b| b[0] / 10).collect();
        let mut sorted = epoch.clone();
        sorted.sort();
        assert_eq!(sorted, (0..8).collect::<Vec<u32>>());
        let again: Vec<u32> = (0..4).flat_map(|s| d.batch(7, s, 2)).map(|b| b[0] / 10).collect();
        assert_eq!(epoch, again, "same seed, same order");
        let other: Vec<u32> = (0..4).flat_map(|s| d.batch(8, s, 2)).map(|b| b[0] / 10).collect();
        assert_ne!(epoch, other, "another seed, another order");
        let next: Vec<u32> = (4..8).flat_map(|s| d.batch(7, s, 2)).map(|b| b[0] / 10).collect();
        assert_ne!(epoch, next, "each epoch is shuffled anew");
        // A batch straddling an epoch boundary (3 does not divide 8).
        assert_eq!(d.batch(7, 2, 3).len(), 3);
        assert!(TokenBlocks::from_tokens(&ids, 49, 2).is_err(), "2 blocks cannot hold 2 held-out and training");
    }

    #[test]
    fn wikitext_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("wiki.test.raw");
        std::fs::write(&f, "x").unwrap();
        assert!(collect_files(&[f]).unwrap_err().to_string().contains("WikiText"));
    }
}
