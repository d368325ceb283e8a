//! Sample images while training: at each step the shared layout names
//! (`loraplane_crds::layout::sample_steps`) the trainer renders one image per prompt with the
//! model as it stands (step 0: the base model, before any training), writes the PNGs and the
//! contact sheet of every set so far into the work dir, and uploads them beside the LoRA
//! (`layout::sample_file`, `layout::CONTACT_SHEET_FILE`). The contact sheet is drawn in
//! `sheet.rs`; rendering is `preview.rs`.

pub mod sheet;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use loraplane_crds::layout::{CONTACT_SHEET_FILE, sample_file, sample_steps};
use loraplane_crds::trainer::TrainerConfig;

use crate::model::vae::VaeDecoder;
use crate::model::{self, DiffusionModel, ModelError, TextConditioning};
use crate::preview::{self, RenderError, RenderOptions};
use crate::storage::{Location, Storage, StorageError};
use sheet::SheetRow;

/// Each image's side on the contact sheet, in pixels.
const SHEET_CELL: u32 = 256;

/// Why a sample set could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// Rendering an image failed.
    #[error("rendering a sample: {0}")]
    Render(#[from] RenderError),
    /// Encoding or decoding a PNG failed.
    #[error("encoding a sample image: {0}")]
    EncodeImage(#[from] image::ImageError),
    /// Writing a file into the work dir failed.
    #[error("writing {path}: {source}")]
    WriteFile {
        path: String,
        source: std::io::Error,
    },
    /// Uploading a file failed.
    #[error(transparent)]
    Upload(#[from] StorageError),
}

/// The sample sets of one run.
pub struct SampleSets {
    prompts: Vec<String>,
    /// Each prompt's conditioning, encoded once by [`SampleSets::prepare`] (the text encoders
    /// are released afterwards).
    conditioning: Vec<TextConditioning>,
    options: RenderOptions,
    /// The steps that get a set.
    due: Vec<u64>,
    decoder: VaeDecoder,
    /// Every set so far, its images already at sheet size (a run keeps up to 50 sets).
    rows: Vec<SheetRow>,
    /// Where the files are written first (`<work>/sample-sets`, then the layout's names).
    local: PathBuf,
    /// The output location they are uploaded under.
    remote: Location,
}

impl SampleSets {
    /// The run's sample sets, or `None` when its config asks for none. The resolution
    /// defaults to the training resolution.
    pub fn new(
        config: &TrainerConfig,
        model_dir: &Path,
        device: &Device,
        work: &Path,
    ) -> Result<Option<SampleSets>, ModelError> {
        let s = &config.samples;
        if s.is_never() {
            return Ok(None);
        }
        let prompts = s.prompts_for(config.concept.concept_type, &config.concept.trigger_word);
        let resolution = if s.resolution == 0 {
            config.training.resolution
        } else {
            s.resolution
        };
        Ok(Some(SampleSets {
            prompts,
            conditioning: Vec::new(),
            options: RenderOptions {
                sampler: None,
                steps: s.steps as usize,
                guidance: s.guidance,
                seed: s.seed,
                resolution: resolution as usize,
            },
            due: sample_steps(config.training.steps, s.every),
            decoder: model::load_vae_decoder(model_dir, device)?,
            rows: Vec::new(),
            local: work.join("sample-sets"),
            remote: Location::parse(&config.output),
        }))
    }

    /// Encodes every prompt's conditioning with `model`'s text encoders, before training
    /// releases them.
    pub fn prepare(&mut self, model: &DiffusionModel) -> Result<(), SampleError> {
        self.conditioning = self
            .prompts
            .iter()
            .map(|p| preview::conditioning(model, p))
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    /// Whether a set is due after `step` training steps (0: before training).
    pub fn due(&self, step: u64) -> bool {
        self.due.contains(&step)
    }

    /// The sets still to render after `step`.
    pub fn left_after(&self, step: u64) -> usize {
        self.due.iter().filter(|s| **s > step).count()
    }

    /// Renders the set of `step` with `model` as it stands, writes and uploads its images and
    /// the contact sheet; returns the images and the seconds it took.
    pub fn render(
        &mut self,
        model: &DiffusionModel,
        step: u64,
        storage: &Storage,
    ) -> Result<(u32, f64), SampleError> {
        let start = Instant::now();
        let mut images = Vec::new();
        for (i, prompt) in self.prompts.iter().enumerate() {
            let options = RenderOptions {
                seed: self.options.seed.wrapping_add(i as u64),
                ..self.options
            };
            let png = match self.conditioning.get(i) {
                Some(cond) => preview::render_with(model, &self.decoder, cond, &options)?,
                None => preview::render(model, &self.decoder, prompt, &options)?,
            };
            self.publish(&sample_file(step, i), &png, storage)?;
            images.push(sheet::cell(
                &image::load_from_memory(&png)?.to_rgb8(),
                SHEET_CELL,
            ));
        }
        let count = images.len() as u32;
        self.rows.push(SheetRow { step, images });
        let mut png = std::io::Cursor::new(Vec::new());
        sheet::contact_sheet(&self.rows, SHEET_CELL).write_to(&mut png, image::ImageFormat::Png)?;
        self.publish(CONTACT_SHEET_FILE, png.get_ref(), storage)?;
        Ok((count, start.elapsed().as_secs_f64()))
    }

    /// After resuming at `step`: the sets of earlier steps back on the sheet, from the work
    /// dir (a retry on the same volume) or from the output location (where an earlier
    /// attempt uploaded them). A set whose images cannot be found is left off the sheet.
    pub fn restore(&mut self, step: u64, storage: &Storage) {
        for &s in self.due.iter().filter(|s| **s <= step) {
            let images: Option<Vec<_>> = (0..self.prompts.len())
                .map(|i| {
                    let name = sample_file(s, i);
                    let bytes = std::fs::read(self.local.join(&name))
                        .ok()
                        .or_else(|| storage.read(&self.remote.join(&name)).ok())?;
                    let img = image::load_from_memory(&bytes).ok()?.to_rgb8();
                    Some(sheet::cell(&img, SHEET_CELL))
                })
                .collect();
            if let Some(images) = images {
                self.rows.push(SheetRow { step: s, images });
            }
        }
    }

    /// Writes `bytes` as `name` into the work dir, then uploads it.
    fn publish(&self, name: &str, bytes: &[u8], storage: &Storage) -> Result<(), SampleError> {
        let path = self.local.join(name);
        let write_err = |source| SampleError::WriteFile {
            path: path.display().to_string(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(write_err)?;
        }
        std::fs::write(&path, bytes).map_err(write_err)?;
        storage.upload(&path, &self.remote.join(name))?;
        Ok(())
    }
}
