//! `Retrieval.py: evaluation` distributed over the ranks of a [`Collective`] (XVLM-REFERENCE.md §5.1):
//! ITC similarities and their top-k, ITM re-scoring of the top-k pairs, recall@K of both rankings.
//! World size 1 ([`crate::collective::SingleProcess`]) runs the same code with every collective a no-op.
//!
//! It lives beside [`RetrievalModel`] because it is that model's evaluation (as `evaluation` sits in
//! Retrieval.py next to the model); the recall arithmetic is shared with the other tasks' metrics in
//! [`crate::metrics::retrieval`].
//!
//! How the work is split (W ranks, Ni images, Nt texts):
//! 1. Rank r encodes only its slices of images and texts: contiguous runs of whole encoding batches
//!    (`image_batch`, `text_batch`), so an item is encoded in the same batch at every W. It keeps its
//!    own vision tokens [ni_r, 1+P, Dv] and text states [nt_r, L, D].
//! 2. All-gather of the small things only: normalised projections [Ni, E], [Nt, E] and text masks
//!    [Nt, L] (padded to the largest slice, trimmed after).
//! 3. Every rank computes the similarities itself, in fixed chunks of `sim_rows` rows (`img @ txtᵀ`
//!    for image→text, `txt @ imgᵀ` for text→image, no temperature), keeps the top-k per row and the
//!    ITC ranks of the ground truth, and drops the chunk: never a whole Ni x Nt matrix.
//! 4. ITM: every pair (image i, text j) named by either top-k is scored once, on the rank that holds
//!    image i (a pair in both top-k lists is one forward, its logit used in both directions). Texts go
//!    to the images, the smaller side: in rounds over global text chunks of `text_chunk` texts, the
//!    owners broadcast that chunk's states, every rank scores its pairs whose text is in the chunk and
//!    drops the chunk. Fusion batches hold pairs of one text chunk and one image batch (at most
//!    `itm_batch`), a grouping fixed by the global top-k alone, so each logit is computed in the same
//!    batch at every W and the metrics are bit-identical at W = 1, 2, 4, ….
//! 5. Each rank writes its logits into zeroed top-k score buffers [Ni, k], [Nt, k]; an all-reduce sum
//!    (each entry non-zero on one rank only, so the sum is exact) makes them identical everywhere.
//!
//! Traffic and memory for COCO 5k test (Ni 5000, Nt 25010, E 256, L 40, D 768, Swin-B 384: 145 x 1024
//! tokens, k 256), per rank: step 2 receives ~38 MB (5 + 26 + 8); step 4 receives every text state it
//! does not own once, (W−1)/W of Nt·L·D·4 B = 3.07 GB, holding one chunk at a time (1024 texts:
//! 126 MB); step 5 sums 31 MB. Held throughout: the own tokens, 3.0 GB/W of images and 3.1 GB/W of
//! texts. All-gathering the token features instead would hold 6 GB on every rank. Each rank scores
//! the pairs of its images: exactly k per image from image→text plus the text→image pairs naming
//! them, about 1/W of the ≤ (Ni + Nt)·k pairs when the texts' top-k spread over the images; images
//! that are in many texts' top-k ("hubs", common in an untrained model) load their rank more.
//! Slices are whole encoding batches, so they differ by up to one batch, not one item: the price of
//! world-independent batches (an item's features would otherwise change in the last bits with W).
//! All collectives are on the model's device (NCCL on GPU, the ring on CPU).

use std::convert::Infallible;
use std::ops::Range;
use std::time::Instant;

use tch::{nn, Device, Kind, Tensor};

use super::RetrievalModel;
use crate::collective::Collective;
use crate::config::{ConfigError, FinetuneKeys, TaskConfig};
use crate::metrics::retrieval::{GroundTruth, RetrievalMetrics, RetrievalRanks, TieRule};
use crate::text::{CrossContext, CrossKv};
use crate::xvlm::ModelError;

mod plan;

/// The images (batch `image_batch`) or texts (`text_batch`) a rank encodes, so a data layer can load
/// only those: `rank_slice(n, batch, world, rank)`.
pub use plan::rank_slice;
use plan::{plan_pairs, rank_slices, PlanShape};

/// Where one rank's evaluation inputs come from. Ranges are global indices into the split; the
/// evaluation asks only for this rank's slices, batch by batch.
pub trait RetrievalSource {
    /// Why a batch could not be read.
    type Error: std::error::Error + Send + Sync + 'static;
    /// Test-transformed images [b, 3, H, W] of `range` (b = its length).
    fn images(&mut self, range: Range<usize>) -> Result<Tensor, Self::Error>;
    /// Token ids and attention masks [b, L] of the texts in `range`, every batch padded to the same L
    /// (`padding='max_length'`, `max_tokens`).
    fn texts(&mut self, range: Range<usize>) -> Result<(Tensor, Tensor), Self::Error>;
}

/// A whole split already in memory: images [Ni, 3, H, W], text ids and masks [Nt, L].
pub struct SplitTensors {
    /// Test-transformed images.
    pub images: Tensor,
    /// Token ids.
    pub text_ids: Tensor,
    /// Attention masks.
    pub text_atts: Tensor,
}

impl RetrievalSource for SplitTensors {
    type Error = Infallible;
    fn images(&mut self, range: Range<usize>) -> Result<Tensor, Infallible> {
        Ok(narrow_rows(&self.images, &range))
    }
    fn texts(&mut self, range: Range<usize>) -> Result<(Tensor, Tensor), Infallible> {
        Ok((
            narrow_rows(&self.text_ids, &range),
            narrow_rows(&self.text_atts, &range),
        ))
    }
}

fn narrow_rows(t: &Tensor, range: &Range<usize>) -> Tensor {
    t.narrow(0, range.start as i64, range.len() as i64)
}

/// Batch sizes, k and chunking of one evaluation; every rank must pass the same values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrievalEvalConfig {
    /// Candidates re-scored by ITM per image and per text (`k_test`).
    pub k_test: usize,
    /// Images per vision-encoder forward (`batch_size_test`).
    pub image_batch: usize,
    /// Texts per text-encoder forward (`batch_size_test_text`).
    pub text_batch: usize,
    /// Most pairs per fusion + ITM-head forward.
    pub itm_batch: usize,
    /// Texts whose states are broadcast and held per ITM round.
    pub text_chunk: usize,
    /// Similarity rows computed at once for the top-k.
    pub sim_rows: usize,
    /// How tied ground truths rank in the recalls.
    pub ties: TieRule,
}

impl RetrievalEvalConfig {
    /// `k_test` and the encoder batch sizes; fusion batches of `k_test` pairs (as the official loop),
    /// text chunks of 1024, similarity chunks of 256 rows, ties against the ground truth.
    pub fn new(k_test: usize, image_batch: usize, text_batch: usize) -> Self {
        RetrievalEvalConfig {
            k_test,
            image_batch,
            text_batch,
            itm_batch: k_test.max(1),
            text_chunk: 1024,
            sim_rows: 256,
            ties: TieRule::AgainstGroundTruth,
        }
    }

    /// From the official task YAML keys `k_test`, `batch_size_test`, `batch_size_test_text`.
    pub fn from_task(task: &TaskConfig) -> Result<Self, ModelError> {
        let keys = FinetuneKeys::from_task(task)?;
        let k_test = keys.k_test.ok_or_else(|| ConfigError::Missing {
            path: task.source.clone(),
            key: "k_test",
        })?;
        Ok(Self::new(
            k_test,
            keys.batch_size_test,
            keys.batch_size_test_text,
        ))
    }

    fn validate(&self) -> Result<(), ModelError> {
        let fields = [
            ("k_test", self.k_test),
            ("image_batch", self.image_batch),
            ("text_batch", self.text_batch),
            ("itm_batch", self.itm_batch),
            ("text_chunk", self.text_chunk),
            ("sim_rows", self.sim_rows),
        ];
        match fields.iter().find(|(_, v)| *v == 0) {
            Some((name, _)) => Err(ModelError::Input(format!(
                "retrieval evaluation: `{name}` must be at least 1"
            ))),
            None => Ok(()),
        }
    }
}

/// The top-k of one direction: per query row, candidate indices, similarities and ITM logits [n, k].
#[derive(Debug)]
pub struct RankedCandidates {
    /// Candidate indices, by descending similarity.
    pub idx: Tensor,
    /// Their similarities.
    pub sim: Tensor,
    /// Their ITM "match" logits (`itm_head(..)[:, 1]`).
    pub itm_score: Tensor,
}

impl RankedCandidates {
    /// Score rows as `Retrieval.evaluation` returns them: the ITM logit at the top-k, −100 elsewhere,
    /// for query rows `rows`, `width` candidates per row.
    pub fn score_rows(&self, rows: Range<usize>, width: usize) -> Tensor {
        let (start, len) = (rows.start as i64, rows.len() as i64);
        let score = self.itm_score.narrow(0, start, len);
        Tensor::full([len, width as i64], -100.0, (score.kind(), score.device())).scatter(
            1,
            &self.idx.narrow(0, start, len),
            &score,
        )
    }

    /// The whole score matrix [n, width] (`score_matrix_i2t` / `score_matrix_t2i`).
    pub fn score_matrix(&self, width: usize) -> Tensor {
        self.score_rows(0..self.idx.size()[0] as usize, width)
    }
}

/// What this rank encoded and keeps.
#[derive(Debug)]
pub struct LocalFeatures {
    /// Its image slice.
    pub images: Range<usize>,
    /// Their vision tokens [ni_r, 1+P, Dv] (an empty [0] tensor when the slice is empty).
    pub image_embeds: Tensor,
    /// Its text slice.
    pub texts: Range<usize>,
    /// Their text-mode states [nt_r, L, D].
    pub text_embeds: Tensor,
}

/// The evaluation of a split, identical on every rank except `local`, `itm_pairs` and `timings`.
#[derive(Debug)]
pub struct RetrievalEvalOutput {
    /// Recalls ranking by similarity alone (zero-shot ITC).
    pub itc: RetrievalMetrics,
    /// Recalls of the official score matrices (ITM logits at the top-k, −100 elsewhere).
    pub itm: RetrievalMetrics,
    /// Per image, its top-k texts [Ni, k].
    pub i2t: RankedCandidates,
    /// Per text, its top-k images [Nt, k].
    pub t2i: RankedCandidates,
    /// Normalised image projections [Ni, E].
    pub image_feat: Tensor,
    /// Normalised text projections [Nt, E].
    pub text_feat: Tensor,
    /// This rank's token features.
    pub local: LocalFeatures,
    /// ITM pairs this rank scored.
    pub itm_pairs: usize,
    /// Where this rank's time went.
    pub timings: EvalTimings,
    sim_rows: usize,
}

/// Wall seconds of each phase on this rank (on CUDA, queued kernels may finish in a later phase).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalTimings {
    /// Reading and encoding this rank's images.
    pub images_s: f64,
    /// Reading and encoding this rank's texts.
    pub texts_s: f64,
    /// Gathering the projections, similarities, top-k and ITC ranks.
    pub similarity_s: f64,
    /// Broadcasting text states and scoring this rank's ITM pairs, assembling the scores.
    pub itm_s: f64,
    /// Recall of the assembled ITM scores.
    pub metrics_s: f64,
}

impl RetrievalEvalOutput {
    /// The ITM recalls under another tie rule, from the score rows in chunks.
    pub fn itm_metrics(
        &self,
        gt: &GroundTruth,
        ties: TieRule,
    ) -> Result<RetrievalMetrics, ModelError> {
        let (ni, nt) = (gt.n_images(), gt.n_texts());
        let mut ranks = RetrievalRanks::new(gt, ties);
        for rows in row_chunks(ni, self.sim_rows) {
            let first = rows.start;
            ranks.add_i2t_rows(gt, &self.i2t.score_rows(rows, nt), first)?;
        }
        for rows in row_chunks(nt, self.sim_rows) {
            let first = rows.start;
            ranks.add_t2i_rows(gt, &self.t2i.score_rows(rows, ni), first)?;
        }
        ranks.metrics()
    }
}

/// `image_feat @ text_featᵀ` (no temperature), or the transpose with the arguments swapped.
pub fn similarities(query_feat: &Tensor, key_feat: &Tensor) -> Tensor {
    query_feat.matmul(&key_feat.tr())
}

fn row_chunks(n: usize, rows: usize) -> impl Iterator<Item = Range<usize>> {
    (0..n).step_by(rows).map(move |a| a..(a + rows).min(n))
}

impl RetrievalModel {
    /// `Retrieval.evaluation` + `itm_eval` on one rank of `comm` (every rank calls it with the same
    /// `gt` and `cfg`; `source` serves this rank's slices). No gradient, eval mode.
    pub fn evaluate<S: RetrievalSource>(
        &self,
        comm: &dyn Collective,
        gt: &GroundTruth,
        source: &mut S,
        cfg: &RetrievalEvalConfig,
    ) -> Result<RetrievalEvalOutput, ModelError> {
        cfg.validate()?;
        tch::no_grad(|| Evaluation::new(self, comm, gt, cfg)?.run(source))
    }
}

/// One evaluation's fixed facts.
struct Evaluation<'a> {
    model: &'a RetrievalModel,
    comm: &'a dyn Collective,
    gt: &'a GroundTruth,
    cfg: &'a RetrievalEvalConfig,
    image_slices: Vec<Range<usize>>,
    text_slices: Vec<Range<usize>>,
    device: Device,
    kind: Kind,
    embed_dim: i64,
    text_width: i64,
}

impl<'a> Evaluation<'a> {
    fn new(
        model: &'a RetrievalModel,
        comm: &'a dyn Collective,
        gt: &'a GroundTruth,
        cfg: &'a RetrievalEvalConfig,
    ) -> Result<Self, ModelError> {
        let (ni, nt) = (gt.n_images(), gt.n_texts());
        if ni == 0 || nt == 0 {
            return Err(ModelError::Input(format!(
                "retrieval evaluation of {ni} images and {nt} texts: both must be non-empty"
            )));
        }
        let proj = |p: &'a Option<nn::Linear>, name: &str| {
            p.as_ref()
                .ok_or_else(|| ModelError::Input(format!("the model was built without `{name}`")))
        };
        let vision_proj = proj(&model.core.vision_proj, "vision_proj")?;
        let text_proj = proj(&model.core.text_proj, "text_proj")?;
        let world = comm.world_size();
        Ok(Evaluation {
            model,
            comm,
            gt,
            cfg,
            image_slices: rank_slices(ni, cfg.image_batch, world),
            text_slices: rank_slices(nt, cfg.text_batch, world),
            device: vision_proj.ws.device(),
            kind: vision_proj.ws.kind(),
            embed_dim: vision_proj.ws.size()[0],
            text_width: text_proj.ws.size()[1],
        })
    }

    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn run<S: RetrievalSource>(&self, source: &mut S) -> Result<RetrievalEvalOutput, ModelError> {
        let mut timings = EvalTimings::default();
        let mut clock = Instant::now();
        let mut lap = || {
            let now = Instant::now();
            let seconds = (now - clock).as_secs_f64();
            clock = now;
            seconds
        };
        let (image_embeds, image_feat) = self.encode_images(source)?;
        timings.images_s = lap();
        let texts = self.encode_texts(source)?;
        timings.texts_s = lap();
        let text_len = self.agree_on_shapes(texts.as_ref().map(|t| t.atts.size()[1]))?;
        let texts = texts.unwrap_or_else(|| self.no_texts(text_len));

        let image_feat = self.gather_rows(&image_feat, &self.image_slices)?;
        let text_feat = self.gather_rows(&texts.feat, &self.text_slices)?;
        let text_atts = self.gather_rows(&texts.atts, &self.text_slices)?;

        let (ni, nt) = (self.gt.n_images(), self.gt.n_texts());
        let (k_i2t, k_t2i) = (self.cfg.k_test.min(nt), self.cfg.k_test.min(ni));
        let mut itc = RetrievalRanks::new(self.gt, self.cfg.ties);
        let (i2t_sim, i2t_idx) = self.top_k(&image_feat, &text_feat, k_i2t, |rows, first| {
            itc.add_i2t_rows(self.gt, rows, first)
        })?;
        let (t2i_sim, t2i_idx) = self.top_k(&text_feat, &image_feat, k_t2i, |rows, first| {
            itc.add_t2i_rows(self.gt, rows, first)
        })?;
        let itc = itc.metrics()?;
        timings.similarity_s = lap();

        let local = LocalFeatures {
            images: self.image_slices[self.rank()].clone(),
            image_embeds,
            texts: self.text_slices[self.rank()].clone(),
            text_embeds: texts.embeds,
        };
        let scores = self.itm_scores(&local, &text_atts, &i2t_idx, &t2i_idx)?;
        timings.itm_s = lap();
        let mut out = RetrievalEvalOutput {
            itc,
            itm: itc,
            i2t: RankedCandidates {
                idx: i2t_idx,
                sim: i2t_sim,
                itm_score: scores.i2t,
            },
            t2i: RankedCandidates {
                idx: t2i_idx,
                sim: t2i_sim,
                itm_score: scores.t2i,
            },
            image_feat,
            text_feat,
            local,
            itm_pairs: scores.pairs,
            timings,
            sim_rows: self.cfg.sim_rows,
        };
        out.itm = out.itm_metrics(self.gt, self.cfg.ties)?;
        out.timings.metrics_s = lap();
        Ok(out)
    }

    /// This rank's images in batches of `image_batch`: vision tokens and normalised projections.
    fn encode_images<S: RetrievalSource>(
        &self,
        source: &mut S,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let core = &self.model.core;
        let slice = self.image_slices[self.rank()].clone();
        let (mut embeds, mut feats) = (Vec::new(), Vec::new());
        for range in row_chunks(slice.len(), self.cfg.image_batch) {
            let range = slice.start + range.start..slice.start + range.end;
            let images = source
                .images(range.clone())
                .map_err(|e| data_error("images", &range, e))?;
            check_rows(&images, &range, "images")?;
            let vision = core.get_vision_embeds(&images.to_device(self.device), false);
            feats.push(core.image_feat(&vision.embeds)?);
            embeds.push(vision.embeds);
        }
        if embeds.is_empty() {
            return Ok((
                Tensor::zeros([0], (self.kind, self.device)),
                Tensor::zeros([0, self.embed_dim], (self.kind, self.device)),
            ));
        }
        Ok((Tensor::cat(&embeds, 0), Tensor::cat(&feats, 0)))
    }

    /// This rank's texts in batches of `text_batch`; `None` when its slice is empty.
    fn encode_texts<S: RetrievalSource>(
        &self,
        source: &mut S,
    ) -> Result<Option<EncodedTexts>, ModelError> {
        let core = &self.model.core;
        let slice = self.text_slices[self.rank()].clone();
        let (mut embeds, mut feats, mut masks) = (Vec::new(), Vec::new(), Vec::new());
        for range in row_chunks(slice.len(), self.cfg.text_batch) {
            let range = slice.start + range.start..slice.start + range.end;
            let (ids, atts) = source
                .texts(range.clone())
                .map_err(|e| data_error("texts", &range, e))?;
            check_rows(&ids, &range, "text ids")?;
            if atts.size() != ids.size() {
                return Err(ModelError::Input(format!(
                    "texts {range:?}: ids {:?} but masks {:?}",
                    ids.size(),
                    atts.size()
                )));
            }
            let (ids, atts) = (ids.to_device(self.device), atts.to_device(self.device));
            let states = core.get_text_embeds(&ids, &atts, false).to_kind(self.kind);
            feats.push(core.text_feat(&states)?);
            embeds.push(states);
            masks.push(atts.to_kind(Kind::Int64));
        }
        if embeds.is_empty() {
            return Ok(None);
        }
        let lens: Vec<i64> = masks.iter().map(|m| m.size()[1]).collect();
        if lens.iter().any(|&l| l != lens[0]) {
            return Err(ModelError::Input(format!(
                "text batches padded to different lengths {lens:?}: pad every text to max_tokens"
            )));
        }
        Ok(Some(EncodedTexts {
            embeds: Tensor::cat(&embeds, 0),
            feat: Tensor::cat(&feats, 0),
            atts: Tensor::cat(&masks, 0),
        }))
    }

    fn no_texts(&self, text_len: i64) -> EncodedTexts {
        EncodedTexts {
            embeds: Tensor::zeros([0, text_len, self.text_width], (self.kind, self.device)),
            feat: Tensor::zeros([0, self.embed_dim], (self.kind, self.device)),
            atts: Tensor::zeros([0, text_len], (Kind::Int64, self.device)),
        }
    }

    /// Checks that every rank evaluates the same split with the same settings and text length; returns
    /// the text length L (`local_len` is `None` on a rank without texts).
    fn agree_on_shapes(&self, local_len: Option<i64>) -> Result<i64, ModelError> {
        let c = self.cfg;
        let mine = [
            self.gt.n_images(),
            self.gt.n_texts(),
            c.k_test,
            c.image_batch,
            c.text_batch,
            c.itm_batch,
            c.text_chunk,
        ]
        .map(|v| v as i64);
        let mut row = mine.to_vec();
        row.push(local_len.unwrap_or(-1));
        let gathered = self
            .comm
            .all_gather(&Tensor::from_slice(&row).to_device(self.device))?;
        let mut len = None;
        for (r, t) in gathered.iter().enumerate() {
            let theirs = Vec::<i64>::try_from(t.to_device(Device::Cpu))
                .map_err(|e| ModelError::Input(format!("rank {r}'s evaluation shape: {e}")))?;
            if theirs[..mine.len()] != mine {
                return Err(ModelError::Input(format!(
                    "rank {r} evaluates (Ni, Nt, k, image, text, itm batch, text chunk) = {:?}, \
                     rank {} {mine:?}",
                    &theirs[..mine.len()],
                    self.rank()
                )));
            }
            match (theirs[mine.len()], len) {
                (-1, _) => {}
                (l, None) => len = Some(l),
                (l, Some(seen)) if l != seen => {
                    return Err(ModelError::Input(format!(
                        "rank {r} pads texts to {l} tokens, another rank to {seen}"
                    )))
                }
                _ => {}
            }
        }
        len.ok_or_else(|| ModelError::Input("no rank holds any text".into()))
    }

    /// Every rank's rows of `local` in rank order (slices are contiguous, so in global order).
    fn gather_rows(&self, local: &Tensor, slices: &[Range<usize>]) -> Result<Tensor, ModelError> {
        if self.comm.world_size() == 1 {
            return Ok(local.shallow_clone());
        }
        let longest = slices.iter().map(|s| s.len()).max().unwrap_or(0) as i64;
        let mut pad_shape = local.size();
        pad_shape[0] = longest - pad_shape[0];
        let padded = Tensor::cat(
            &[
                local.shallow_clone(),
                Tensor::zeros(pad_shape, (local.kind(), local.device())),
            ],
            0,
        );
        let parts = self.comm.all_gather(&padded)?;
        let trimmed: Vec<Tensor> = parts
            .iter()
            .zip(slices)
            .map(|(part, s)| part.narrow(0, 0, s.len() as i64))
            .collect();
        Ok(Tensor::cat(&trimmed, 0))
    }

    /// Top-`k` keys per query by similarity, in chunks of `sim_rows` query rows; `on_rows` sees each
    /// chunk of similarity rows with its first query index. Returns (similarities, indices) [n, k].
    fn top_k(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        k: usize,
        mut on_rows: impl FnMut(&Tensor, usize) -> Result<(), ModelError>,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let (mut sims, mut idx) = (Vec::new(), Vec::new());
        for rows in row_chunks(queries.size()[0] as usize, self.cfg.sim_rows) {
            let chunk = similarities(&narrow_rows(queries, &rows), keys);
            let (s, i) = chunk.topk(k as i64, 1, true, true);
            on_rows(&chunk, rows.start)?;
            sims.push(s);
            idx.push(i);
        }
        Ok((Tensor::cat(&sims, 0), Tensor::cat(&idx, 0)))
    }

    /// ITM logits of every top-k pair, each scored on the rank holding its image, assembled on all.
    fn itm_scores(
        &self,
        local: &LocalFeatures,
        text_atts: &Tensor,
        i2t_idx: &Tensor,
        t2i_idx: &Tensor,
    ) -> Result<TopKScores, ModelError> {
        let (k_i2t, k_t2i) = (i2t_idx.size()[1] as usize, t2i_idx.size()[1] as usize);
        let nt = self.gt.n_texts();
        let plan = plan_pairs(
            local.images.clone(),
            &index_vec(i2t_idx)?,
            k_i2t,
            &index_vec(t2i_idx)?,
            k_t2i,
            PlanShape {
                n_texts: nt,
                image_batch: self.cfg.image_batch,
                text_chunk: self.cfg.text_chunk,
                itm_batch: self.cfg.itm_batch,
            },
        );
        let mut i2t = vec![0f32; self.gt.n_images() * k_i2t];
        let mut t2i = vec![0f32; nt * k_t2i];
        let rows = |values: Vec<i64>| Tensor::from_slice(&values).to_device(self.device);
        for (chunk, round) in plan.rounds.iter().enumerate() {
            let span = chunk * self.cfg.text_chunk..((chunk + 1) * self.cfg.text_chunk).min(nt);
            let states = self.text_chunk_states(&local.text_embeds, &span)?;
            let batches = &plan.batches[round.clone()];
            let Some(first) = batches.first() else {
                continue;
            };
            let mut logits = Vec::with_capacity(batches.len());
            let mut group_kv: Option<(Range<usize>, CrossKv)> = None;
            for batch in batches {
                let pairs = &plan.pairs[batch.clone()];
                // A fusion batch never spans two image batches: the keys and values of the batch's
                // image group are projected once per text chunk, not once per pair.
                let group = self.image_group(local, pairs[0].image);
                let held = match group_kv.take() {
                    Some((g, kv)) if g == group => (g, kv),
                    _ => {
                        let tokens = local.image_embeds.narrow(
                            0,
                            (group.start - local.images.start) as i64,
                            group.len() as i64,
                        );
                        (group.clone(), self.model.core.text.cross_kv(&tokens))
                    }
                };
                let kv = &group_kv.insert(held).1;
                let image_rows = rows(
                    pairs
                        .iter()
                        .map(|p| (p.image - group.start) as i64)
                        .collect(),
                );
                let chunk_rows = rows(pairs.iter().map(|p| (p.text - span.start) as i64).collect());
                let text_ids = rows(pairs.iter().map(|p| p.text as i64).collect());
                logits.push(self.match_logits(
                    kv,
                    image_rows,
                    local.image_embeds.size()[1],
                    &states.index_select(0, &chunk_rows),
                    &text_atts.index_select(0, &text_ids),
                )?);
            }
            let values = Vec::<f32>::try_from(
                Tensor::cat(&logits, 0)
                    .to_kind(Kind::Float)
                    .to_device(Device::Cpu),
            )
            .map_err(|e| ModelError::Input(format!("ITM logits: {e}")))?;
            let scored = &plan.pairs[first.start..batches[batches.len() - 1].end];
            for (pair, &v) in scored.iter().zip(&values) {
                if let Some(s) = pair.i2t_slot {
                    i2t[s] = v;
                }
                if let Some(s) = pair.t2i_slot {
                    t2i[s] = v;
                }
            }
        }
        let assemble = |values: &[f32], k: usize| -> Result<Tensor, ModelError> {
            let mut t = Tensor::from_slice(values)
                .view([-1, k as i64])
                .to_device(self.device);
            self.comm.all_reduce_sum(&mut t)?;
            Ok(t)
        };
        Ok(TopKScores {
            i2t: assemble(&i2t, k_i2t)?,
            t2i: assemble(&t2i, k_t2i)?,
            pairs: plan.pairs.len(),
        })
    }

    /// The text states of global texts `span` [len, L, D] on every rank: each owner broadcasts its
    /// part (no collective at world size 1).
    fn text_chunk_states(&self, own: &Tensor, span: &Range<usize>) -> Result<Tensor, ModelError> {
        let (rank, world) = (self.rank(), self.comm.world_size());
        let own_slice = &self.text_slices[rank];
        let mut parts = Vec::new();
        for (owner, slice) in self.text_slices.iter().enumerate() {
            let (lo, hi) = (span.start.max(slice.start), span.end.min(slice.end));
            if lo >= hi {
                continue;
            }
            let mut part = if owner == rank {
                own.narrow(0, (lo - own_slice.start) as i64, (hi - lo) as i64)
            } else {
                let s = own.size();
                Tensor::zeros([(hi - lo) as i64, s[1], s[2]], (own.kind(), own.device()))
            };
            if world > 1 {
                self.comm.broadcast(&mut part, owner)?;
            }
            parts.push(part);
        }
        Ok(match parts.len() {
            1 => parts.remove(0),
            _ => Tensor::cat(&parts, 0),
        })
    }

    /// The image batch (global indices) holding `image`, cut to this rank's slice: the images whose
    /// cross-attention keys and values are projected together.
    fn image_group(&self, local: &LocalFeatures, image: usize) -> Range<usize> {
        let batch = self.cfg.image_batch;
        let start = (image / batch * batch).max(local.images.start);
        start..(start + batch).min(local.images.end)
    }

    /// `itm_head(fusion(text, image))[:, 1]` for text row `i` against image `image_rows[i]` of `kv`
    /// (vision tokens of `image_tokens` positions, all attended).
    fn match_logits(
        &self,
        kv: &CrossKv,
        image_rows: Tensor,
        image_tokens: i64,
        text_embeds: &Tensor,
        text_atts: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let core = &self.model.core;
        let itm_head = core
            .itm_head
            .as_ref()
            .ok_or_else(|| ModelError::Input("the model was built without `itm_head`".into()))?;
        let ones = Tensor::ones(
            [image_rows.size()[0], image_tokens],
            (Kind::Int64, text_embeds.device()),
        );
        let cross = [CrossContext::projected(kv, Some(image_rows), &ones)];
        let cls = core
            .text
            .forward_fusion(text_embeds, text_atts, &cross, false)
            .select(1, 0);
        Ok(nn::Module::forward(itm_head, &cls).select(1, 1))
    }
}

/// A rank's encoded texts.
struct EncodedTexts {
    embeds: Tensor,
    feat: Tensor,
    atts: Tensor,
}

/// The assembled top-k ITM logits and how many pairs this rank scored.
struct TopKScores {
    i2t: Tensor,
    t2i: Tensor,
    pairs: usize,
}

fn data_error(
    what: &'static str,
    range: &Range<usize>,
    e: impl std::error::Error + Send + Sync + 'static,
) -> ModelError {
    ModelError::EvalData {
        what,
        range: range.clone(),
        source: Box::new(e),
    }
}

fn check_rows(t: &Tensor, range: &Range<usize>, what: &str) -> Result<(), ModelError> {
    match t.size().first() {
        Some(&n) if n as usize == range.len() => Ok(()),
        _ => Err(ModelError::Input(format!(
            "{what} {range:?}: got a batch of shape {:?}",
            t.size()
        ))),
    }
}

fn index_vec(t: &Tensor) -> Result<Vec<usize>, ModelError> {
    let flat = t.to_device(Device::Cpu).to_kind(Kind::Int64).reshape([-1]);
    let values = Vec::<i64>::try_from(&flat)
        .map_err(|e| ModelError::Input(format!("top-k indices: {e}")))?;
    Ok(values.into_iter().map(|v| v as usize).collect())
}
