//! Tiny random SD1.5-/SDXL-style checkpoints in the exact diffusers folder layout, with real
//! diffusers/transformers config keys, for tests, the demo and benchmarks (no model
//! downloads anywhere).
//!
//! Weights are produced by running the real loaders against a recording backend that
//! invents a seeded random tensor for every name and shape asked for, so the written files
//! contain precisely the tensors a loader of this architecture reads.
//!
//! FLUX.1 has no writer here: its tiny pipeline is made by diffusers itself
//! (`bench/make_flux_fixtures.py`, committed under `tests/fixtures/flux`). Its full-size
//! transformer is built in memory with random weights for the GPU check
//! ([`random_flux_transformer`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use serde_json::{Value, json};

use super::flux::transformer::{FluxConfig, FluxTransformer, LoraTargets};
use super::weights::Weights;
use super::{ModelError, ModelFamily, clip, read_config, unet, vae};
use crate::model::layers::lora::{LoraSpec, SplitMix64, fnv1a};
use crate::model::sd::tokenizer::{BpeVocab, EOS, write, write_err};

/// Words the tiny tokenizer's merges are learnt from (typical caption vocabulary).
const CORPUS: &[&str] = &[
    "a",
    "photo",
    "of",
    "the",
    "in",
    "on",
    "with",
    "and",
    "person",
    "man",
    "woman",
    "dog",
    "cat",
    "portrait",
    "picture",
    "painting",
    "style",
    "standing",
    "sitting",
    "smiling",
    "wearing",
    "red",
    "blue",
    "green",
    "black",
    "white",
    "yellow",
    "hat",
    "shirt",
    "dress",
    "jacket",
    "glasses",
    "background",
    "street",
    "city",
    "forest",
    "beach",
    "mountain",
    "studio",
    "lighting",
    "close",
    "up",
    "full",
    "body",
    "face",
    "hair",
    "long",
    "short",
    "blonde",
    "brown",
    "eyes",
    "looking",
    "at",
    "camera",
    "outdoors",
    "indoors",
    "night",
    "day",
    "sunset",
    "high",
    "quality",
    "detailed",
    "sharp",
    "focus",
    "cinematic",
    "sks",
    "zxq",
    "ohwx",
    "character",
    "object",
    "toy",
    "car",
    "house",
    "tree",
    "flower",
    "garden",
    "table",
    "chair",
    "holding",
    "walking",
    "running",
    "happy",
    "young",
    "old",
    "beautiful",
    "small",
    "large",
    "front",
    "side",
    "view",
    "from",
    "above",
    "below",
    "illustration",
    "drawing",
    "anime",
    "realistic",
    "render",
    "art",
    "digital",
    "oil",
    "watercolor",
    "sketch",
    "by",
    "an",
    "is",
    "this",
    "that",
    "two",
    "three",
    "one",
    "people",
    "group",
    "children",
    "playing",
];

/// Target vocabulary size of the tiny tokenizers (bytes, byte+`</w>`, merges, specials).
const TINY_VOCAB: usize = 1000;

/// `unet/config.json` of Stable Diffusion 1.5.
pub const FULL_SD15_UNET: &str = r#"{
            "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
            "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                 "CrossAttnDownBlock2D", "DownBlock2D"],
            "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
            "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                               "CrossAttnUpBlock2D"]
}"#;

/// `unet/config.json` of SDXL 1.0 base.
pub const FULL_SDXL_UNET: &str = r#"{
            "_class_name": "UNet2DConditionModel", "act_fn": "silu",
            "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280], "center_input_sample": false,
            "class_embed_type": null, "class_embeddings_concat": false, "conv_in_kernel": 3,
            "conv_out_kernel": 3, "cross_attention_dim": 2048, "cross_attention_norm": null,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "downsample_padding": 1, "dual_cross_attention": false, "encoder_hid_dim": null,
            "encoder_hid_dim_type": null, "flip_sin_to_cos": true, "freq_shift": 0,
            "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": null,
            "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
            "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": null,
            "num_class_embeds": null, "only_cross_attention": false, "out_channels": 4,
            "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
            "resnet_skip_time_act": false, "resnet_time_scale_shift": "default",
            "sample_size": 128, "time_cond_proj_dim": null, "time_embedding_act_fn": null,
            "time_embedding_dim": null, "time_embedding_type": "positional",
            "timestep_post_act": null, "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "upcast_attention": null, "use_linear_projection": true
        }"#;

/// `vae/config.json` of the SD1.5 VAE (SDXL's differs only in `scaling_factor`).
pub const FULL_VAE: &str = r#"{
            "_class_name": "AutoencoderKL", "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D",
                                 "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
            "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
            "scaling_factor": 0.18215,
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D",
                               "UpDecoderBlock2D", "UpDecoderBlock2D"]
        }"#;

/// How big a random model to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelSize {
    /// Channels 32/64, 1-2 layers, hidden 32: a training step well under a second on CPU.
    Tiny,
    /// The published SD1.5 / SDXL architectures (for benchmarks; SD1.5 is ~4.5 GB in f32).
    Full,
}

/// Writes a tiny random model of `family` into `dir` (created if needed).
pub fn write_tiny_model(dir: &Path, family: ModelFamily, seed: u64) -> Result<(), ModelError> {
    write_random_model(dir, family, ModelSize::Tiny, seed)
}

/// Writes a random model of `family` and `size` into `dir` (created if needed). The
/// tokenizers are always the small learnt vocabulary (ids stay below every `vocab_size`).
pub fn write_random_model(
    dir: &Path,
    family: ModelFamily,
    size: ModelSize,
    seed: u64,
) -> Result<(), ModelError> {
    if family == ModelFamily::Flux1 {
        return Err(ModelError::UnsupportedConfig {
            path: dir.to_path_buf(),
            reason: "no tiny FLUX.1 writer: the tiny FLUX.1 pipeline is tests/fixtures/flux, \
                     made by diffusers (bench/make_flux_fixtures.py)"
                .into(),
        });
    }
    let full = size == ModelSize::Full;
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e))?;
    let xl = family == ModelFamily::Sdxl;

    let vocab = BpeVocab::train(CORPUS, TINY_VOCAB - 512 - 2);
    vocab.write_vocab_merges(&dir.join("tokenizer"), EOS)?;
    if xl {
        // As in SDXL's `tokenizer_2`, which pads with "!" instead of the EOS token.
        vocab.write_vocab_merges(&dir.join("tokenizer_2"), "!")?;
    }
    let vocab_size = vocab.len();
    let (bos, eos) = (vocab_size - 2, vocab_size - 1);

    let mut index = json!({
        "_class_name": if xl { "StableDiffusionXLPipeline" } else { "StableDiffusionPipeline" },
        "_diffusers_version": "0.31.0",
        "scheduler": ["diffusers", if xl { "EulerDiscreteScheduler" } else { "PNDMScheduler" }],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    });
    if let Some(obj) = index.as_object_mut() {
        if xl {
            obj.insert(
                "text_encoder_2".into(),
                json!(["transformers", "CLIPTextModelWithProjection"]),
            );
            obj.insert(
                "tokenizer_2".into(),
                json!(["transformers", "CLIPTokenizer"]),
            );
            obj.insert("force_zeros_for_empty_prompt".into(), json!(true));
        } else {
            obj.insert("safety_checker".into(), json!([null, null]));
            obj.insert("feature_extractor".into(), json!([null, null]));
            obj.insert("requires_safety_checker".into(), json!(false));
        }
    }
    write(&dir.join("model_index.json"), &index)?;

    write(
        &dir.join("scheduler").join("scheduler_config.json"),
        &json!({
            "_class_name": if xl { "EulerDiscreteScheduler" } else { "PNDMScheduler" },
            "_diffusers_version": "0.31.0",
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "prediction_type": "epsilon",
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "trained_betas": null,
            "clip_sample": false,
            "set_alpha_to_one": false,
            "skip_prk_steps": true,
        }),
    )?;

    let text_cfg = |hidden_act: &str, with_projection: bool| -> Value {
        let (vocab_size, hidden, inter, layers, heads) = match (full, with_projection) {
            (false, _) => (vocab_size, 32, 37, 2, 4),
            (true, false) => (49408, 768, 3072, 12, 12),
            (true, true) => (49408, 1280, 5120, 32, 20),
        };
        json!({
            "_name_or_path": "loraplane/tiny",
            "architectures": [if with_projection { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }],
            "model_type": "clip_text_model",
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "max_position_embeddings": 77,
            "hidden_act": hidden_act,
            "layer_norm_eps": 1e-5,
            "projection_dim": if full { hidden } else { 32 },
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": 1,
            "initializer_range": 0.02,
            "torch_dtype": "float32",
        })
    };
    write_component(
        dir,
        "text_encoder",
        "model.safetensors",
        &text_cfg("quick_gelu", false),
        seed,
        |vb, path| {
            let cfg: clip::ClipTextConfig = read_config(path)?;
            clip::ClipTextModel::load(vb, &cfg, false).map(|_| ())
        },
    )?;
    if xl {
        write_component(
            dir,
            "text_encoder_2",
            "model.safetensors",
            &text_cfg("gelu", true),
            seed,
            |vb, path| {
                let cfg: clip::ClipTextConfig = read_config(path)?;
                clip::ClipTextModel::load(vb, &cfg, true).map(|_| ())
            },
        )?;
    }

    write_random_unet(dir, family, size, seed)?;

    let mut vae_cfg = json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.31.0",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [32, 32, 64, 64],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 64,
        "scaling_factor": if xl { 0.13025 } else { 0.18215 },
        "force_upcast": true,
    });
    if full {
        let mut v: Value = serde_json::from_str(FULL_VAE).map_err(|e| write_err(dir, e))?;
        if let (Some(obj), true) = (v.as_object_mut(), xl) {
            obj.insert("scaling_factor".into(), json!(0.13025));
        }
        vae_cfg = v;
    }
    write_component(
        dir,
        "vae",
        "diffusion_pytorch_model.safetensors",
        &vae_cfg,
        seed,
        |vb, path| {
            let cfg: vae::VaeConfig = read_config(path)?;
            vae::VaeEncoder::load(vb, &cfg)?;
            vae::VaeDecoder::load(vb, &cfg).map(|_| ())
        },
    )?;
    Ok(())
}

/// Writes only the `unet/` folder of the random model [`write_random_model`] writes (config
/// and seeded weights, the same tensors for the same seed): what a UNet benchmark loads, and
/// what a reference implementation can load too.
pub fn write_random_unet(
    dir: &Path,
    family: ModelFamily,
    size: ModelSize,
    seed: u64,
) -> Result<(), ModelError> {
    let unet_cfg = unet_config(family, size).map_err(|e| write_err(dir, e))?;
    write_component(
        dir,
        "unet",
        "diffusion_pytorch_model.safetensors",
        &unet_cfg,
        seed,
        |vb, path| {
            let cfg: unet::UNetConfig = read_config(path)?;
            unet::UNet2DConditionModel::load(vb, &cfg, None).map(|_| ())
        },
    )
}

/// The `unet/config.json` of a random model of `family` and `size` (the tiny ones are
/// written here; the full ones are the published configs above).
pub fn unet_config(family: ModelFamily, size: ModelSize) -> Result<Value, serde_json::Error> {
    let xl = family == ModelFamily::Sdxl;
    let cfg = if size == ModelSize::Full {
        let text = if xl { FULL_SDXL_UNET } else { FULL_SD15_UNET };
        serde_json::from_str(text)?
    } else if xl {
        json!({
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.31.0",
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "center_input_sample": false,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "only_cross_attention": false,
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
            "act_fn": "silu",
            "norm_num_groups": 32,
            "norm_eps": 1e-5,
            "cross_attention_dim": 64,
            "transformer_layers_per_block": [1, 2],
            "attention_head_dim": [2, 4],
            "num_attention_heads": null,
            "dual_cross_attention": false,
            "use_linear_projection": true,
            "class_embed_type": null,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 32 + 6 * 8,
            "num_class_embeds": null,
            "upcast_attention": false,
            "resnet_time_scale_shift": "default",
            "time_embedding_type": "positional",
            "time_embedding_dim": null,
        })
    } else {
        json!({
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.31.0",
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "center_input_sample": false,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "only_cross_attention": false,
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
            "act_fn": "silu",
            "norm_num_groups": 32,
            "norm_eps": 1e-5,
            "cross_attention_dim": 32,
            "attention_head_dim": 2,
            "dual_cross_attention": false,
            "use_linear_projection": false,
            "class_embed_type": null,
            "num_class_embeds": null,
            "upcast_attention": false,
            "resnet_time_scale_shift": "default",
        })
    };
    Ok(cfg)
}

/// A UNet of `family` and `size` with seeded random weights and LoRA adapters, built in
/// memory (no files): benchmarks of full-size models need no 3.4 GB checkpoint on disk.
pub fn random_unet(
    family: ModelFamily,
    size: ModelSize,
    seed: u64,
    lora: &LoraSpec,
) -> Result<unet::UNet2DConditionModel, ModelError> {
    let path = Path::new("unet/config.json");
    let value = unet_config(family, size).map_err(|e| write_err(path, e))?;
    let cfg: unet::UNetConfig = serde_json::from_value(value).map_err(|e| write_err(path, e))?;
    let backend = std::sync::Arc::new(RandomBackend {
        seed: seed ^ fnv1a("unet"),
        tensors: Mutex::new(HashMap::new()),
    });
    let vb = VarBuilder::from_backend(Box::new(SharedBackend(backend)), DType::F32, Device::Cpu);
    unet::UNet2DConditionModel::load(&Weights::new(vb, "unet"), &cfg, Some(lora))
}

/// Writes `config.json`, builds the component against the random backend and saves every
/// tensor it asked for.
fn write_component(
    dir: &Path,
    name: &str,
    weights_file: &str,
    config: &Value,
    seed: u64,
    build: impl FnOnce(&Weights, &Path) -> Result<(), ModelError>,
) -> Result<(), ModelError> {
    let cdir = dir.join(name);
    let cfg_path = cdir.join("config.json");
    write(&cfg_path, config)?;
    let backend = RandomBackend {
        seed: seed ^ fnv1a(name),
        tensors: Mutex::new(HashMap::new()),
    };
    let recorded = {
        let shared = std::sync::Arc::new(backend);
        let vb = VarBuilder::from_backend(
            Box::new(SharedBackend(shared.clone())),
            DType::F32,
            Device::Cpu,
        );
        build(&Weights::new(vb, name), &cfg_path)?;
        let map = shared
            .tensors
            .lock()
            .map_err(|_| write_err(&cdir, "weight recorder poisoned"))?;
        map.clone()
    };
    let out = cdir.join(weights_file);
    candle_core::safetensors::save(&recorded, &out).map_err(|e| write_err(&out, e))
}

/// Invents a seeded random tensor per (name, shape) and remembers it.
struct RandomBackend {
    seed: u64,
    tensors: Mutex<HashMap<String, Tensor>>,
}

struct SharedBackend(std::sync::Arc<RandomBackend>);

impl RandomBackend {
    fn make(&self, shape: &Shape, name: &str) -> Vec<f32> {
        let mut rng = SplitMix64::new(self.seed ^ fnv1a(name));
        let dims = shape.dims();
        let n = shape.elem_count();
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let parent = name.rsplit('.').nth(1).unwrap_or("");
        let is_norm = parent.contains("norm");
        if dims.len() == 1 {
            if is_norm && leaf == "weight" {
                return (0..n)
                    .map(|_| (1.0 + 0.1 * rng.next_normal()) as f32)
                    .collect();
            }
            return (0..n).map(|_| (0.02 * rng.next_normal()) as f32).collect();
        }
        // Embedding tables get CLIP's small init; everything else fan-in scaling.
        let std = if parent.contains("embedding") && !parent.contains("linear") {
            0.02
        } else {
            let fan_in: usize = dims[1..].iter().product();
            1.0 / (fan_in.max(1) as f64).sqrt()
        };
        (0..n).map(|_| (std * rng.next_normal()) as f32).collect()
    }
}

impl SimpleBackend for SharedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut map = self
            .0
            .tensors
            .lock()
            .map_err(|_| candle_core::Error::Msg("weight recorder poisoned".into()))?;
        if let Some(t) = map.get(name) {
            if t.shape() != &s {
                candle_core::bail!("tensor {name} requested with two shapes");
            }
            return t.to_dtype(dtype)?.to_device(dev);
        }
        let t = Tensor::from_vec(self.0.make(&s, name), s, &Device::Cpu)?;
        map.insert(name.to_string(), t.clone());
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("tiny model writer needs a shape for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

/// FLUX.1's transformer for `cfg` with random weights and LoRA adapters, built directly on
/// `device` in `dtype` (no host copy, nothing on disk): the full-size model of the GPU check
/// (`trainer-bench --full-flux`) is 12 B parameters.
pub fn random_flux_transformer(
    cfg: &FluxConfig,
    lora: &LoraSpec,
    device: &Device,
    dtype: DType,
) -> Result<FluxTransformer, ModelError> {
    let vb = VarBuilder::from_backend(Box::new(DeviceRandom), dtype, device.clone());
    FluxTransformer::load(
        &Weights::new(vb, "transformer"),
        cfg,
        Some(lora),
        &LoraTargets::default(),
    )
}

/// Random tensors drawn where they will live: norm scales near one, matrices with fan-in
/// scaling, biases small.
struct DeviceRandom;

impl SimpleBackend for DeviceRandom {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims().to_vec();
        let norm_scale = dims.len() == 1 && name.contains("norm") && name.ends_with("weight");
        let t = if norm_scale {
            Tensor::ones(s, DType::F32, dev)?
        } else {
            let fan_in: usize = dims.get(1..).map_or(1, |d| d.iter().product());
            let std = if dims.len() == 1 {
                0.02
            } else {
                1.0 / (fan_in.max(1) as f64).sqrt()
            };
            Tensor::randn(0f32, std as f32, s, dev)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    //! The loaders build the full-size SD1.5 and SDXL architectures from their published
    //! configs with exactly the published parameter counts (so every tensor name and shape a
    //! real checkpoint holds is asked for). A shape-only backend keeps this free of memory.
    use super::*;

    #[derive(Default)]
    struct Counter {
        params: Mutex<(usize, usize)>,
    }

    struct CountingBackend(std::sync::Arc<Counter>);

    impl SimpleBackend for CountingBackend {
        fn get(
            &self,
            s: Shape,
            _name: &str,
            _h: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            let mut p = self.0.params.lock().unwrap();
            p.0 += s.elem_count();
            p.1 += 1;
            Tensor::zeros((), dtype, dev)?.broadcast_as(s)
        }
        fn get_unchecked(&self, n: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
            candle_core::bail!("no shape for {n}")
        }
        fn contains_tensor(&self, _name: &str) -> bool {
            false
        }
    }

    fn count(build: impl FnOnce(&Weights) -> Result<(), ModelError>) -> (usize, usize) {
        let counter = std::sync::Arc::new(Counter::default());
        let vb = VarBuilder::from_backend(
            Box::new(CountingBackend(counter.clone())),
            DType::F32,
            Device::Cpu,
        );
        build(&Weights::new(vb, "count")).unwrap();
        *counter.params.lock().unwrap()
    }

    #[test]
    fn full_size_sd15_unet_has_the_published_parameter_count() {
        let cfg: unet::UNetConfig = serde_json::from_str(FULL_SD15_UNET).unwrap();
        let (params, tensors) =
            count(|vb| unet::UNet2DConditionModel::load(vb, &cfg, None).map(|_| ()));
        assert_eq!(params, 859_520_964);
        assert_eq!(tensors, 686);
    }

    #[test]
    fn full_size_sdxl_unet_has_the_published_parameter_count() {
        let cfg: unet::UNetConfig = serde_json::from_str(FULL_SDXL_UNET).unwrap();
        let (params, tensors) =
            count(|vb| unet::UNet2DConditionModel::load(vb, &cfg, None).map(|_| ()));
        assert_eq!(params, 2_567_463_684);
        assert_eq!(tensors, 1680);
    }

    #[test]
    fn full_size_clip_text_encoders_have_the_published_parameter_counts() {
        let l: clip::ClipTextConfig = serde_json::from_value(json!({
            "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
            "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu", "projection_dim": 768
        }))
        .unwrap();
        let (params, _) = count(|vb| clip::ClipTextModel::load(vb, &l, false).map(|_| ()));
        assert_eq!(params, 123_060_480);
        let g: clip::ClipTextConfig = serde_json::from_value(json!({
            "vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120,
            "num_hidden_layers": 32, "num_attention_heads": 20, "max_position_embeddings": 77,
            "hidden_act": "gelu", "projection_dim": 1280
        }))
        .unwrap();
        let (params, _) = count(|vb| clip::ClipTextModel::load(vb, &g, true).map(|_| ()));
        assert_eq!(params, 694_659_840);
    }

    #[test]
    fn full_size_vae_encoder_has_the_published_parameter_count() {
        let cfg: vae::VaeConfig = serde_json::from_str(FULL_VAE).unwrap();
        let (params, _) = count(|vb| vae::VaeEncoder::load(vb, &cfg).map(|_| ()));
        // AutoencoderKL's encoder (34,163,592) plus quant_conv (72).
        assert_eq!(params, 34_163_664);
    }

    #[test]
    fn full_size_vae_decoder_has_the_published_parameter_count() {
        let cfg: vae::VaeConfig = serde_json::from_str(FULL_VAE).unwrap();
        let (params, _) = count(|vb| vae::VaeDecoder::load(vb, &cfg).map(|_| ()));
        // AutoencoderKL's decoder plus post_quant_conv (20): with the encoder and quant_conv,
        // the 83,653,863 parameters of the published SD VAE.
        assert_eq!(params + 34_163_664, 83_653_863);
    }
}
