//! What every fine-tune task's setup shares: loading an init checkpoint the way the official fine-tune
//! loaders do (non-strict: the pre-training heads are dropped), and the task's tokenizer.

use std::sync::Arc;

use tch::nn::VarStore;
use xvlm_model::checkpoint::{adapt_for_finetune, load_state_dict, LoadOptions, StateDict};
use xvlm_model::config::TaskConfig;
use xvlm_model::data::tokenizer::TextTokenizer;
use xvlm_model::xvlm::vision_config;

use crate::trainer::harness::setup::{other, read_init_checkpoint};
use crate::trainer::task::TaskError;

/// Reads `init_checkpoint` and adapts it as `xvlm.py:load_pretrained(..., load_text=True)` does (vision
/// position information resized to the task's images, `bert.` dropped from text-encoder keys).
pub(crate) fn read_finetune_checkpoint(
    task: &TaskConfig,
    url: &str,
) -> Result<StateDict, TaskError> {
    let mut sd = read_init_checkpoint(url)?;
    let vision = vision_config(task).map_err(other)?;
    adapt_for_finetune(&mut sd, &vision, true)
        .map_err(|e| other(format!("init_checkpoint {url}: {e}")))?;
    Ok(sd)
}

/// Loads `sd` (already in the task model's layout) into `vs` non-strictly, skipping the tied `aliases`;
/// a model weight the checkpoint lacks is an error naming `url`, unless `may_be_new` allows it (the
/// task's freshly initialised heads). `task` names the model in messages.
pub(crate) fn load_init_weights(
    vs: &VarStore,
    sd: &StateDict,
    aliases: Vec<(String, String)>,
    url: &str,
    task: &str,
    may_be_new: impl Fn(&str) -> bool,
) -> Result<(), TaskError> {
    let opts = LoadOptions {
        strict: false,
        ignore: aliases.into_iter().map(|(alias, _)| alias).collect(),
    };
    let report =
        load_state_dict(vs, sd, &opts).map_err(|e| other(format!("init_checkpoint {url}: {e}")))?;
    let missing: Vec<&String> = report.missing.iter().filter(|k| !may_be_new(k)).collect();
    if let Some(first) = missing.first() {
        return Err(other(format!(
            "init_checkpoint {url} lacks {} weights of the {task} model (e.g. {first}): not a \
             checkpoint of this config",
            missing.len()
        )));
    }
    tracing::info!(checkpoint = %url, task, %report, "loaded init_checkpoint");
    Ok(())
}

/// The tokenizer of the task's `text_encoder` folder.
pub(crate) fn task_tokenizer(task: &TaskConfig) -> Result<Arc<TextTokenizer>, TaskError> {
    let vocab = task.vocab_dir().ok_or_else(|| {
        other(format!(
            "{}: missing key `text_encoder`",
            task.source.display()
        ))
    })?;
    Ok(Arc::new(
        TextTokenizer::from_dir(&vocab, task.use_roberta).map_err(other)?,
    ))
}
