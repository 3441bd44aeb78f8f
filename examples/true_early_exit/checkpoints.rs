//! `--save` and `--load`: `--save run.safetensors` writes the phase-2 model (the first mode
//! run, with its optimizer, tokenizer and threshold: `lego::train::save_training_checkpoint`)
//! to `run.safetensors` and the phase-1 model to `run.phase1.safetensors`. `--load` reuses
//! finished stages instead of training them again: a phase-1 checkpoint skips phase 1; a
//! phase-2 checkpoint (with its phase-1 file beside it) skips phase 1 and the phase-2 mode it
//! holds (another requested mode is trained from the same extended starting point as before,
//! since `extend` is seeded). The tokenizer and the model's sizes come from the checkpoint
//! (size flags are then ignored), and a checkpoint whose test documents differ from this
//! run's split is refused (`Split::check_metadata`), which would leak test text into
//! training. A stage is either loaded or run.
//!
//! The baseline has its own flag, `--baseline PATH`: read from `PATH` if the file is there
//! (after the same split check), else trained and written there. Runs that share one
//! baseline, as `scripts/phase2-study.sh` does, then train it once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lego::data::{Split, Tokenizer};
use lego::model::LegoTransformer;
use lego::optim::AdamW;
use lego::report::experiment::{Phase2Record, Stage, mode_name};
use lego::train::{Phase2Mode, TrainingCheckpoint, load_training_checkpoint, save_training_checkpoint};
use lego::{Error, Result};

use super::Phase2Run;
use super::options::Options;

/// `<stem>.phase1.<ext>` beside `path`.
fn phase1_path(path: &Path) -> PathBuf {
    let stem = path.file_stem().map_or("checkpoint".into(), |s| s.to_string_lossy().into_owned());
    let ext = path.extension().map_or("safetensors".into(), |e| e.to_string_lossy().into_owned());
    path.with_file_name(format!("{stem}.phase1.{ext}"))
}

/// Creates the directory `path` goes in, if it has one.
fn create_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// The metadata that lets `--load` reuse a stage: the stage's record, and the split.
fn stage_metadata(
    phase: &str,
    stage: &Stage,
    split: &Split,
    threshold: f32,
    o: &Options,
) -> BTreeMap<String, String> {
    let mut meta = stage.to_metadata();
    meta.extend(split.to_metadata());
    meta.extend([
        ("phase".into(), phase.into()),
        ("routing_threshold".into(), threshold.to_string()),
        ("seed".into(), o.run.seed.to_string()),
    ]);
    meta
}

/// `--save`: the phase-2 model (the first mode run) at `path`, phase 1 beside it.
pub fn save(
    path: &Path,
    tok: &Tokenizer,
    split: &Split,
    threshold: f32,
    o: &Options,
    (phase1, phase1_opt, phase1_stage): (&LegoTransformer, &AdamW, &Stage),
    run: &Phase2Run,
) -> Result<()> {
    create_parent(path)?;
    let p1 = phase1_path(path);
    save_training_checkpoint(
        &p1,
        phase1,
        tok,
        phase1_opt,
        &stage_metadata("phase1", phase1_stage, split, threshold, o),
    )?;
    let mut meta = stage_metadata("phase2", &run.record.stage, split, threshold, o);
    meta.insert("phase2_mode".into(), mode_name(run.record.mode).into());
    save_training_checkpoint(path, &run.model, tok, &run.opt, &meta)?;
    eprintln!("saved {} and {}", path.display(), p1.display());
    Ok(())
}

/// What `--load` read: always a phase-1 checkpoint, and a phase-2 one if given.
pub struct Loaded {
    pub phase1: TrainingCheckpoint,
    phase2: Option<TrainingCheckpoint>,
}

impl Loaded {
    /// Reads `path` (and, for a phase-2 checkpoint, the phase-1 file beside it), and checks
    /// that they were trained on this run's split.
    pub fn read(path: &Path, split: &Split) -> Result<Loaded> {
        let first = load_training_checkpoint(path)?;
        let (phase1, phase2) = match first.phase() {
            "phase1" => (first, None),
            "phase2" => (load_training_checkpoint(&phase1_path(path))?, Some(first)),
            other => {
                let msg = format!("{}: phase '{other}', expected 'phase1' or 'phase2'", path.display());
                return Err(Error::Input(msg));
            }
        };
        for ckpt in std::iter::once(&phase1).chain(&phase2) {
            split.check_metadata(&ckpt.metadata, &ckpt.origin)?;
        }
        eprintln!("loaded {}", path.display());
        Ok(Loaded { phase1, phase2 })
    }

    pub fn phase1_model(&self) -> Result<(LegoTransformer, AdamW, Stage)> {
        let model = self.phase1.model.deep_clone();
        let opt = self.phase1.optimizer.to_optimizer(&model)?;
        Ok((model, opt, Stage::from_checkpoint(&self.phase1)?))
    }

    /// The phase-2 run of `mode`, if the checkpoint holds that mode.
    pub fn phase2_model(&self, mode: Phase2Mode) -> Option<Result<Phase2Run>> {
        let c = self
            .phase2
            .as_ref()
            .filter(|c| c.metadata.get("phase2_mode").map(String::as_str) == Some(mode_name(mode)))?;
        let model = c.model.deep_clone();
        Some(c.optimizer.to_optimizer(&model).and_then(|opt| {
            Ok(Phase2Run { model, opt, record: Phase2Record { mode, stage: Stage::from_checkpoint(c)? } })
        }))
    }
}

/// `--baseline PATH`: the baseline and its stage from `path`, if that file exists (`None`
/// if not: then it is trained and [`save_baseline`] writes it).
pub fn load_baseline(path: &Path, split: &Split) -> Result<Option<(LegoTransformer, Stage)>> {
    if !path.exists() {
        return Ok(None);
    }
    let ckpt = load_training_checkpoint(path)?;
    split.check_metadata(&ckpt.metadata, &ckpt.origin)?;
    if ckpt.phase() != "baseline" {
        let msg = format!("{}: phase '{}', expected 'baseline'", path.display(), ckpt.phase());
        return Err(Error::Input(msg));
    }
    eprintln!("loaded the baseline from {}", path.display());
    let stage = Stage::from_checkpoint(&ckpt)?;
    Ok(Some((ckpt.model, stage)))
}

/// Writes the trained baseline (with its optimizer and stage) to `path`.
pub fn save_baseline(
    path: &Path,
    tok: &Tokenizer,
    split: &Split,
    o: &Options,
    (model, opt, stage): (&LegoTransformer, &AdamW, &Stage),
) -> Result<()> {
    create_parent(path)?;
    // The baseline has no routing threshold of its own.
    let mut meta = stage_metadata("baseline", stage, split, f32::NAN, o);
    meta.remove("routing_threshold");
    save_training_checkpoint(path, model, tok, opt, &meta)?;
    eprintln!("saved the baseline to {}", path.display());
    Ok(())
}
