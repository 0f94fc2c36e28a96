//! Parity kind `finetune_data`: the fine-tuning datasets and collate functions end to end, from a case
//! folder's annotation files and images to the model inputs the official code produced. Every tensor of
//! `expected.safetensors` is computed by `data::finetune` from the folder's `config.yaml` (its
//! `task_configs`), `data/`, `images/`, `vocab.txt`, `info.json` (`image_files`) and the random draws
//! the case recorded (VQA flip draws, box-crop draws). Extra rows check the decoded pixels against
//! `batch.safetensors`, the collated image tensors, and the strings of `info.json` where present.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tch::{Kind, Tensor};

use super::{compare, not_computed, CaseSpec, Comparison, ParityError, Tolerance};
use crate::data::finetune::config::read_yaml;
use crate::data::finetune::grounding::{self, BoxDraws, GroundingDataConfig, GroundingEntry};
use crate::data::finetune::images::{self, ImageAt, ImageTransform};
use crate::data::finetune::loader::load_batch;
use crate::data::finetune::nlvr::{self, NlvrDataConfig};
use crate::data::finetune::retrieval::{
    RetrievalDataConfig, RetrievalEvalSet, RetrievalTrainData, RetrievalTrainSet,
};
use crate::data::finetune::source::ImageRoot;
use crate::data::finetune::vqa::{self, VqaDataConfig, VqaEntry};
use crate::data::tokenizer::TextTokenizer;
use crate::data::DataError;

fn invalid(path: &Path, reason: impl ToString) -> ParityError {
    ParityError::Read {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn extra_f64(spec: &CaseSpec, key: &str, default: f64) -> f64 {
    spec.extra
        .get(key)
        .and_then(serde_yaml::Value::as_f64)
        .unwrap_or(default)
}

/// Everything computed for the case, and what it is compared with.
struct Run {
    dir: PathBuf,
    expected: HashMap<String, Tensor>,
    info: Value,
    tok: Arc<TextTokenizer>,
    /// Image location → index into `info.json` `image_files`.
    image_index: HashMap<PathBuf, usize>,
    /// `image{k}.tensor` as computed here.
    image_tensors: Vec<Tensor>,
    computed: HashMap<String, (Tensor, Tolerance)>,
    extra_rows: Vec<Comparison>,
    exact: Tolerance,
    pixels: Tolerance,
    floats: Tolerance,
    threads: usize,
}

impl Run {
    fn data_err(&self, e: DataError) -> ParityError {
        invalid(&self.dir, e)
    }

    fn put(&mut self, name: &str, t: Tensor, tol: Tolerance) {
        self.computed.insert(name.to_string(), (t, tol));
    }

    fn put_exact(&mut self, name: &str, t: Tensor) {
        let tol = self.exact;
        self.put(name, t, tol);
    }

    fn ints(values: impl IntoIterator<Item = i64>) -> Tensor {
        Tensor::from_slice(&values.into_iter().collect::<Vec<i64>>())
    }

    /// `info.json` image_files index of an image.
    fn index_of(&self, at: &ImageAt) -> Result<i64, ParityError> {
        self.image_index
            .get(Path::new(&at.location))
            .map(|&k| k as i64)
            .ok_or_else(|| {
                invalid(
                    &self.dir,
                    format!("{} is not among info.json image_files", at.location),
                )
            })
    }

    fn indices<'a>(
        &self,
        images: impl IntoIterator<Item = &'a ImageAt>,
    ) -> Result<Tensor, ParityError> {
        let v = images
            .into_iter()
            .map(|a| self.index_of(a))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::ints(v))
    }

    /// A row comparing a collated image batch with the official per-image tensors its indices name.
    fn check_collated(&mut self, name: &str, got: &Tensor, indices: &Tensor) {
        let rows: Option<Vec<Tensor>> = Vec::<i64>::try_from(indices).ok().and_then(|ks| {
            ks.iter()
                .map(|k| {
                    self.expected
                        .get(&format!("image{k}.tensor"))
                        .map(Tensor::shallow_clone)
                })
                .collect()
        });
        let row = match rows {
            Some(rows) if !rows.is_empty() => {
                compare(name, got, &Tensor::stack(&rows, 0), self.pixels)
            }
            _ => not_computed(name),
        };
        self.extra_rows.push(row);
    }

    /// A row checking strings against `info.json` at `pointer` (skipped when the case lacks it).
    fn check_strings(&mut self, pointer: &str, got: &[String]) {
        let Some(want) = self.info.pointer(pointer) else {
            return;
        };
        let want: Option<Vec<String>> = want
            .as_array()
            .and_then(|a| a.iter().map(|v| v.as_str().map(String::from)).collect());
        let ok = want.as_deref() == Some(got);
        self.extra_rows.push(Comparison {
            name: format!("info.json{pointer}"),
            max_abs: if ok { 0.0 } else { f64::INFINITY },
            max_rel: if ok { 0.0 } else { f64::INFINITY },
            passed: ok,
            note: (!ok).then(|| format!("got {got:?}, info.json has {want:?}")),
        });
    }

    fn put_text(&mut self, prefix: &str, batch: crate::data::finetune::text::TextBatch) {
        self.put_exact(&format!("{prefix}.text_ids"), batch.ids);
        self.put_exact(&format!("{prefix}.text_atts"), batch.atts);
    }
}

/// Computes the tensors of one task from its config file.
type TaskRunner = fn(&mut Run, &Path) -> Result<(), ParityError>;

fn task_config_path(dir: &Path, top: &serde_yaml::Value, task: &str) -> Option<PathBuf> {
    top.get("task_configs")
        .and_then(|m| m.get(task))
        .and_then(serde_yaml::Value::as_str)
        .map(|f| dir.join(f))
}

fn tokenizer(dir: &Path, top: &serde_yaml::Value) -> Result<TextTokenizer, ParityError> {
    let roberta = top
        .get("use_roberta")
        .and_then(serde_yaml::Value::as_bool)
        .unwrap_or(false);
    let result = match top.get("vocab").and_then(serde_yaml::Value::as_str) {
        Some(v) => TextTokenizer::from_vocab_txt(&dir.join(v)),
        None => {
            let te = top
                .get("text_encoder")
                .and_then(serde_yaml::Value::as_str)
                .unwrap_or(".");
            TextTokenizer::from_dir(&dir.join(te), roberta)
        }
    };
    result.map_err(|e| invalid(dir, e))
}

/// Computes every tensor of the case and compares it with `expected`.
pub fn run(
    dir: &Path,
    spec: &CaseSpec,
    expected: &[(String, Tensor)],
) -> Result<Vec<Comparison>, ParityError> {
    let top = read_yaml(&dir.join("config.yaml")).map_err(|e| invalid(dir, e))?;
    let info_path = dir.join("info.json");
    let info: Value = serde_json::from_str(
        &std::fs::read_to_string(&info_path).map_err(|e| invalid(&info_path, e))?,
    )
    .map_err(|e| invalid(&info_path, e))?;
    let image_root = top
        .get("image_root")
        .and_then(serde_yaml::Value::as_str)
        .ok_or_else(|| invalid(dir, "config.yaml has no image_root"))?;
    let image_res = top
        .get("image_res")
        .and_then(serde_yaml::Value::as_u64)
        .ok_or_else(|| invalid(dir, "config.yaml has no image_res"))? as usize;
    let root = ImageRoot(dir.join(image_root).display().to_string());
    let files: Vec<String> = info
        .get("image_files")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|v| v.as_str().map(String::from)).collect())
        .ok_or_else(|| invalid(&info_path, "no image_files list"))?;
    let rtol = spec.rtol.unwrap_or(1e-6);
    let atol = spec.atol.unwrap_or(1e-7);
    let mut run = Run {
        dir: dir.to_path_buf(),
        expected: expected
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect(),
        info,
        tok: Arc::new(tokenizer(dir, &top)?),
        image_index: HashMap::new(),
        image_tensors: Vec::new(),
        computed: HashMap::new(),
        extra_rows: Vec::new(),
        exact: Tolerance {
            rtol: 0.0,
            atol: 0.0,
        },
        pixels: Tolerance {
            rtol: 0.0,
            atol: extra_f64(spec, "tensor_atol", 0.016),
        },
        floats: Tolerance { rtol, atol },
        threads: 2,
    };
    let decoded_tol = Tolerance {
        rtol: 0.0,
        atol: extra_f64(spec, "decoded_max_abs_u8", 0.0),
    };
    images_per_file(&mut run, &root, &files, image_res, decoded_tol)?;
    let tasks: [(&str, TaskRunner); 5] = [
        ("re", retrieval),
        ("vqa", vqa_task),
        ("nlvr", nlvr_task),
        ("grounding", grounding_weak),
        ("grounding_bbox", grounding_bbox),
    ];
    for (task, f) in tasks {
        if let Some(path) = task_config_path(dir, &top, task) {
            f(&mut run, &path)?;
        }
    }
    let mut rows: Vec<Comparison> = expected
        .iter()
        .map(|(name, want)| match run.computed.get(name) {
            Some((got, tol)) => compare(name, got, want, *tol),
            None => not_computed(name),
        })
        .collect();
    rows.append(&mut run.extra_rows);
    Ok(rows)
}

/// `image{k}.tensor` (test transform) and the decoded pixels of every file against `batch.safetensors`.
fn images_per_file(
    run: &mut Run,
    root: &ImageRoot,
    files: &[String],
    res: usize,
    decoded_tol: Tolerance,
) -> Result<(), ParityError> {
    let batch_path = run.dir.join("batch.safetensors");
    let batch: HashMap<String, Tensor> = Tensor::read_safetensors(&batch_path)
        .map_err(|e| invalid(&batch_path, e))?
        .into_iter()
        .collect();
    let transform = ImageTransform::test(res);
    for (k, rel) in files.iter().enumerate() {
        let at =
            ImageAt::new(root, rel, "info.json image_files", k).map_err(|e| run.data_err(e))?;
        run.image_index.insert(PathBuf::from(&at.location), k);
        let img = at.decode().map_err(|e| run.data_err(e))?;
        let chw = transform.apply(
            &mut crate::data::finetune::loader::sample_rng(0, 0, k),
            &img,
        );
        let r = res as i64;
        let tensor = Tensor::from_slice(&chw).view([3, r, r]);
        let name = format!("image{k}.tensor");
        let tol = run.pixels;
        run.put(&name, tensor.shallow_clone(), tol);
        run.image_tensors.push(tensor);
        let decoded_name = format!("image{k}.decoded_rgb");
        let got = Tensor::from_slice(&img.data)
            .view([img.height as i64, img.width as i64, 3])
            .to_kind(Kind::Float);
        let row = match batch.get(&decoded_name) {
            Some(want) => compare(&decoded_name, &got, &want.to_kind(Kind::Float), decoded_tol),
            None => continue,
        };
        run.extra_rows.push(row);
    }
    Ok(())
}

fn retrieval(run: &mut Run, path: &Path) -> Result<(), ParityError> {
    let cfg = RetrievalDataConfig::load(path).map_err(|e| run.data_err(e))?;
    let root = ImageRoot(cfg.image_root.clone());
    let set = RetrievalTrainSet::load(&cfg.train_file, &root, cfg.max_words)
        .map_err(|e| run.data_err(e))?;
    let image_index = run.indices(&set.images)?;
    let data = RetrievalTrainData {
        set: Arc::new(set),
        tokenizer: run.tok.clone(),
        transform: ImageTransform::test(cfg.image_res),
        // The official Retrieval.train call: padding longest with max_length, no truncation.
        truncate_to: None,
    };
    let all: Vec<usize> = (0..data.set.len()).collect();
    let batch = load_batch(&data, &all, 0, 0, run.threads).map_err(|e| run.data_err(e))?;
    run.check_collated("re_train.image (collated)", &batch.image, &image_index);
    run.put_exact("re_train.image_index", image_index);
    run.put_exact("re_train.idx", batch.idx);
    run.put_exact("re_train.text_ids", batch.text_ids);
    run.put_exact("re_train.text_atts", batch.text_atts);
    if let Some(test) = cfg.test_file.as_deref() {
        let set = RetrievalEvalSet::load(test, &root, &cfg, run.tok.clone())
            .map_err(|e| run.data_err(e))?;
        let image_index = run.indices(&set.images)?;
        let images = set
            .load_image_range(0..set.num_images(), run.threads)
            .map_err(|e| run.data_err(e))?;
        run.check_collated("re_test.image (collated)", &images, &image_index);
        run.check_strings("/re_test/text", &set.texts);
        let n = set.num_images() as i64;
        run.put_exact("re_test.image_index", image_index);
        run.put_exact("re_test.index", Tensor::arange(n, tch::kind::INT64_CPU));
        run.put_exact("re_test.img2txt", set.img2txt_padded());
        run.put_exact(
            "re_test.txt2img",
            Run::ints(set.txt2img.iter().map(|&i| i as i64)),
        );
        let text = set
            .tokenize_texts(0..set.num_texts())
            .map_err(|e| run.data_err(e))?;
        run.put_text("re_test", text);
    }
    Ok(())
}

fn recorded(run: &Run, name: &str) -> Result<Tensor, ParityError> {
    run.expected
        .get(name)
        .map(Tensor::shallow_clone)
        .ok_or_else(|| invalid(&run.dir, format!("the recorded draws {name} are missing")))
}

fn vqa_task(run: &mut Run, path: &Path) -> Result<(), ParityError> {
    let cfg = VqaDataConfig::load(path).map_err(|e| run.data_err(e))?;
    let train = vqa::load_train(&cfg).map_err(|e| run.data_err(e))?;
    let draws = Vec::<f64>::try_from(&recorded(run, "vqa_train.hflip_draw")?)
        .map_err(|e| invalid(&run.dir, e))?;
    if draws.len() != train.len() {
        return Err(invalid(
            &run.dir,
            format!(
                "{} flip draws for {} VQA train items",
                draws.len(),
                train.len()
            ),
        ));
    }
    let transform = ImageTransform::test(cfg.image_res);
    let mut images_chw = Vec::new();
    let mut flipped = Vec::new();
    for (i, (e, d)) in train.iter().zip(&draws).enumerate() {
        let mut rng = crate::data::finetune::loader::sample_rng(0, 0, i);
        let (img, f) =
            vqa::load_train_image(e, *d, &transform, &mut rng).map_err(|e| run.data_err(e))?;
        images_chw.push(img);
        flipped.push(i64::from(f));
    }
    let entries: Vec<&VqaEntry> = train.iter().collect();
    let batch = vqa::collate_train(
        &run.tok,
        &entries,
        &images_chw,
        cfg.image_res,
        cfg.max_tokens,
    )
    .map_err(|e| run.data_err(e))?;
    let questions: Vec<String> = train.iter().map(|e| e.question.clone()).collect();
    run.check_strings("/vqa_train/questions_after_pre_question", &questions);
    let answers: Vec<String> = train.iter().flat_map(|e| e.answers.clone()).collect();
    run.check_strings("/vqa_train/answers", &answers);
    let image_index = run.indices(train.iter().map(|e| &e.image))?;
    let pixels_tol = run.pixels;
    let floats = run.floats;
    run.put("vqa_train.image", batch.image, pixels_tol);
    run.put("vqa_train.hflip_draw", Tensor::from_slice(&draws), floats);
    run.put_exact("vqa_train.hflipped", Run::ints(flipped));
    run.put_exact("vqa_train.image_index", image_index);
    run.put_exact("vqa_train.k", Run::ints(batch.k));
    run.put_exact("vqa_train.text_ids", batch.text_ids);
    run.put_exact("vqa_train.text_atts", batch.text_atts);
    run.put_exact("vqa_train.answer_ids", batch.answer_ids);
    run.put_exact("vqa_train.answer_atts", batch.answer_atts);
    run.put("vqa_train.weights", batch.weights, floats);

    let test = vqa::load_test(&cfg).map_err(|e| run.data_err(e))?;
    if !test.is_empty() {
        let image_index = run.indices(test.iter().map(|e| &e.image))?;
        let imgs: Vec<Vec<f32>> = test
            .iter()
            .map(|e| {
                transform.load(
                    &mut crate::data::finetune::loader::sample_rng(0, 0, 0),
                    &e.image,
                )
            })
            .collect::<Result<_, _>>()
            .map_err(|e| run.data_err(e))?;
        let entries: Vec<&VqaEntry> = test.iter().collect();
        let batch = vqa::collate_test(&run.tok, &entries, &imgs, cfg.image_res)
            .map_err(|e| run.data_err(e))?;
        run.check_collated("vqa_test.image (collated)", &batch.image, &image_index);
        let questions: Vec<String> = test.iter().map(|e| e.question.clone()).collect();
        run.check_strings("/vqa_test/questions_after_pre_question", &questions);
        run.put_exact("vqa_test.image_index", image_index);
        run.put_exact("vqa_test.question_id", batch.question_id);
        run.put_exact("vqa_test.text_ids", batch.text_ids);
        run.put_exact("vqa_test.text_atts", batch.text_atts);
    }
    if cfg.answer_list.is_some() {
        let list = vqa::load_answer_list(&cfg).map_err(|e| run.data_err(e))?;
        let raw: Vec<String> = list
            .iter()
            .map(|a| a.strip_suffix(&cfg.eos).unwrap_or(a).to_string())
            .collect();
        run.check_strings("/vqa_test/answer_list", &raw);
        let enc = vqa::encode_answer_list(&run.tok, &list).map_err(|e| run.data_err(e))?;
        run.put_exact("vqa_test.answer_list_ids", enc.ids);
        run.put_exact("vqa_test.answer_list_atts", enc.atts);
    }
    Ok(())
}

fn nlvr_task(run: &mut Run, path: &Path) -> Result<(), ParityError> {
    let cfg = NlvrDataConfig::load(path).map_err(|e| run.data_err(e))?;
    for (split, files) in [
        ("nlvr_train", &cfg.train_file),
        ("nlvr_test", &cfg.test_file),
    ] {
        if files.is_empty() {
            continue;
        }
        let entries = nlvr::load_split(&cfg, files).map_err(|e| run.data_err(e))?;
        let sentences: Vec<String> = entries.iter().map(|e| e.sentence.clone()).collect();
        run.check_strings(&format!("/{split}/sentences_after_pre_caption"), &sentences);
        let left = run.indices(entries.iter().map(|e| &e.images[0]))?;
        let right = run.indices(entries.iter().map(|e| &e.images[1]))?;
        let pairs: Vec<[Vec<f32>; 2]> = Vec::<i64>::try_from(&left)
            .unwrap_or_default()
            .iter()
            .zip(Vec::<i64>::try_from(&right).unwrap_or_default())
            .map(|(&a, b)| {
                [
                    tensor_values(&run.image_tensors[a as usize]),
                    tensor_values(&run.image_tensors[b as usize]),
                ]
            })
            .collect();
        let refs: Vec<&nlvr::NlvrEntry> = entries.iter().collect();
        let batch =
            nlvr::collate(&run.tok, &refs, &pairs, cfg.image_res).map_err(|e| run.data_err(e))?;
        run.put_exact(&format!("{split}.image0_index"), left);
        run.put_exact(&format!("{split}.image1_index"), right);
        run.put_exact(&format!("{split}.targets"), batch.targets);
        run.put_exact(&format!("{split}.text_ids"), batch.text_ids);
        run.put_exact(&format!("{split}.text_atts"), batch.text_atts);
    }
    Ok(())
}

fn tensor_values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap_or_default()
}

/// `image_index`, `ref_id` and texts of a grounding test split (weak and bbox alike).
fn grounding_test(
    run: &mut Run,
    prefix: &str,
    entries: &[GroundingEntry],
    texts_pointer: &str,
) -> Result<(), ParityError> {
    let texts: Vec<String> = entries.iter().map(|e| e.text.clone()).collect();
    run.check_strings(texts_pointer, &texts);
    let refs: Vec<&GroundingEntry> = entries.iter().collect();
    let enc = grounding::encode_texts(&run.tok, &refs, None).map_err(|e| run.data_err(e))?;
    let image_index = run.indices(entries.iter().map(|e| &e.image))?;
    run.put_exact(&format!("{prefix}.image_index"), image_index);
    run.put_exact(
        &format!("{prefix}.ref_id"),
        Run::ints(entries.iter().map(|e| e.ref_id)),
    );
    run.put_text(prefix, enc);
    Ok(())
}

fn grounding_weak(run: &mut Run, path: &Path) -> Result<(), ParityError> {
    let cfg = GroundingDataConfig::load(path).map_err(|e| run.data_err(e))?;
    let train = grounding::load_split(&cfg, &cfg.train_file).map_err(|e| run.data_err(e))?;
    let texts: Vec<String> = train.iter().map(|e| e.text.clone()).collect();
    run.check_strings("/grounding_train/texts_after_pre_caption", &texts);
    check_img_ids(run, &train);
    let refs: Vec<&GroundingEntry> = train.iter().collect();
    let enc = grounding::encode_texts(&run.tok, &refs, None).map_err(|e| run.data_err(e))?;
    let image_index = run.indices(train.iter().map(|e| &e.image))?;
    run.put_exact("grounding_train.image_index", image_index);
    run.put_exact(
        "grounding_train.idx",
        Run::ints(train.iter().map(|e| e.idx)),
    );
    run.put_text("grounding_train", enc);
    let test = grounding::load_split(&cfg, &cfg.test_file).map_err(|e| run.data_err(e))?;
    grounding_test(
        run,
        "grounding_test",
        &test,
        "/grounding_test/texts_after_pre_caption",
    )
}

/// `info.json` `grounding_train.img_ids` (file name → id) against the entries' ids.
fn check_img_ids(run: &mut Run, train: &[GroundingEntry]) {
    let Some(map) = run
        .info
        .pointer("/grounding_train/img_ids")
        .and_then(Value::as_object)
    else {
        return;
    };
    let ok = train.iter().all(|e| {
        let name = Path::new(&e.image.location)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        map.get(&name).and_then(Value::as_i64) == Some(e.idx)
    });
    run.extra_rows.push(Comparison {
        name: "info.json/grounding_train/img_ids".into(),
        max_abs: if ok { 0.0 } else { f64::INFINITY },
        max_rel: if ok { 0.0 } else { f64::INFINITY },
        passed: ok,
        note: (!ok).then(|| "image ids differ".to_string()),
    });
}

fn grounding_bbox(run: &mut Run, path: &Path) -> Result<(), ParityError> {
    let cfg = GroundingDataConfig::load(path).map_err(|e| run.data_err(e))?;
    let refer = cfg.refer().map_err(|e| run.data_err(e))?;
    let train = grounding::load_split(&cfg, &cfg.train_file).map_err(|e| run.data_err(e))?;
    let texts: Vec<String> = train.iter().map(|e| e.text.clone()).collect();
    run.check_strings("/grounding_bbox/train_texts_after_pre_caption", &texts);
    let crops =
        Vec::<i64>::try_from(recorded(run, "grounding_bbox_train.crop_x0y0x1y1")?.flatten(0, -1))
            .map_err(|e| invalid(&run.dir, e))?;
    let flips = Vec::<f64>::try_from(&recorded(run, "grounding_bbox_train.hflip_draw")?)
        .map_err(|e| invalid(&run.dir, e))?;
    if crops.len() != 4 * train.len() || flips.len() != train.len() {
        return Err(invalid(
            &run.dir,
            format!(
                "recorded draws do not match the {} box-training items",
                train.len()
            ),
        ));
    }
    let (mut chw, mut targets, mut flipped, mut boxes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, e) in train.iter().enumerate() {
        let rec = refer.get(e.ref_id).ok_or_else(|| {
            run.data_err(
                e.image
                    .err(format!("ref_id {} is not in {}", e.ref_id, refer.refs_file)),
            )
        })?;
        let img = e.image.decode().map_err(|err| run.data_err(err))?;
        let draws = BoxDraws {
            crop: [
                crops[4 * i],
                crops[4 * i + 1],
                crops[4 * i + 2],
                crops[4 * i + 3],
            ],
            flip_draw: flips[i],
        };
        let no_flip = cfg.careful_hflip && grounding::mentions_side(&e.text);
        let s = grounding::box_sample(&img, rec.bbox, draws, no_flip, cfg.image_res)
            .map_err(|why| run.data_err(e.image.err(why)))?;
        chw.push(images::normalize(&s.image));
        targets.push(s.target);
        flipped.push(i64::from(s.flipped));
        boxes.extend(rec.bbox);
    }
    let refs: Vec<&GroundingEntry> = train.iter().collect();
    let enc = grounding::encode_texts(&run.tok, &refs, None).map_err(|e| run.data_err(e))?;
    let image_index = run.indices(train.iter().map(|e| &e.image))?;
    let (pixels_tol, floats) = (run.pixels, run.floats);
    let n = train.len() as i64;
    run.put(
        "grounding_bbox_train.image",
        images::stack(&chw, cfg.image_res),
        pixels_tol,
    );
    run.put(
        "grounding_bbox_train.target_bbox",
        grounding::stack_targets(&targets),
        floats,
    );
    run.put(
        "grounding_bbox_train.ref_bbox_xywh",
        Tensor::from_slice(&boxes).view([n, 4]),
        floats,
    );
    run.put_exact(
        "grounding_bbox_train.crop_x0y0x1y1",
        Tensor::from_slice(&crops).view([n, 4]),
    );
    run.put(
        "grounding_bbox_train.hflip_draw",
        Tensor::from_slice(&flips),
        floats,
    );
    run.put_exact("grounding_bbox_train.hflipped", Run::ints(flipped));
    run.put_exact("grounding_bbox_train.image_index", image_index);
    run.put_text("grounding_bbox_train", enc);
    let test = grounding::load_split(&cfg, &cfg.test_file).map_err(|e| run.data_err(e))?;
    grounding_test(
        run,
        "grounding_bbox_test",
        &test,
        "/grounding_bbox/test_texts_after_pre_caption",
    )
}
