"""Writes trainer-image/tests/fixtures/flux/: a tiny random FLUX.1-dev pipeline made by
diffusers and transformers themselves (`FluxPipeline.save_pretrained`, so every folder has
exactly the layout and key names current libraries write: transformers 5 saves `CLIPTextModel`
without the `text_model.` prefix and tokenizers as `tokenizer.json`) and
`reference.safetensors`: fixed inputs and what the libraries compute from them.
`tests/model_flux.rs` loads the folder through the trainer's own loader and must reproduce
them, in `make test`, without Python.

The pipeline: `transformer` (FluxTransformer2DModel: 2 double, 2 single blocks, guidance
embedding), `vae` (AutoencoderKL, 16 latent channels, shift and scaling factors as FLUX.1's),
`text_encoder` (CLIPTextModel) with the CLIP tokenizer of the trainer's tiny SD1.5 model,
`text_encoder_2` (T5EncoderModel, gated GELU) with a small Unigram `tokenizer_2`, and
`scheduler` (FlowMatchEulerDiscreteScheduler as FLUX.1-dev's config). Random weights.

Beside the pipeline, `spiece/spiece.model`: tokenizer_2's vocabulary as the SentencePiece
protobuf older T5 folders ship instead of `tokenizer.json` (written here field by field, as
the sentencepiece package is not in the venv), which must tokenize alike.

References (`reference.safetensors`):
- `transformer.*`: the transformer on packed latents, T5 states and a pooled vector, at two
  sigmas and guidance values (batch 2); `rope.*`: FluxPosEmbed's tables for its ids;
- `t5.ids`, `t5.hidden`: tokenizer_2's padded ids for PROMPTS and T5's last hidden state;
- `clip.ids`, `clip.pooled`: the CLIP tokenizer's ids and CLIPTextModel's pooler output;
- `vae.image`, `vae.latent`, `vae.z`, `vae.decoded`: the encoder's posterior mean for an
  image and the decoder's output for latents (unscaled, as the VAE sees them);
- `render.noise`, `render.image`: FluxPipeline's image (in [0, 1]) for PROMPTS[0] from
  `latents=` (the noise packed), RENDER_STEPS flow-matching Euler steps, guidance 3.5,
  RENDER_SIZE pixels, T5 rows of T5_MAX_LENGTH tokens.

    .tools/bench-venv/bin/python trainer-image/bench/make_flux_fixtures.py

(needs the Rust toolchain for the tiny SD1.5 tokenizer, and torch, diffusers and transformers:
trainer-image/bench/venv.sh).
"""

import json
import os
import shutil
import subprocess
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "trainer-image", "tests", "fixtures", "flux")
SEED = 20
# Must match tests/model_flux.rs.
PROMPTS = ["a photo of zxq dog", "red car in the  snow, portrait style!"]
T5_MAX_LENGTH = 16
RENDER_STEPS = 3
RENDER_SIZE = 32
LATENT_CHANNELS = 16
TRANSFORMER = dict(
    patch_size=1,
    in_channels=4 * LATENT_CHANNELS,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=16,
    guidance_embeds=True,
    axes_dims_rope=(2, 2, 4),
)
BATCH = 2
LATENT_HW = (8, 6)  # latent rows x columns: 4 x 3 tokens after 2x2 packing
TEXT_TOKENS = 5
WORDS = ["photo", "of", "zxq", "dog", "red", "car", "in", "the", "snow", "style", "portrait",
         "woman", "man", "cat"]
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"


def img_ids(h, w):
    """The ids FluxPipeline._prepare_latent_image_ids gives a (h/2) x (w/2) token grid."""
    import torch

    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def t5_vocab():
    """(piece, score) of the small Unigram vocabulary: pad, eos, unk, then the pieces."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -2.0 - 0.1 * i) for i, w in enumerate(WORDS)]
    vocab += [(p, -5.0 - 0.05 * i) for i, p in enumerate(["og", "ph", "ot", "zx", "st", "yle"])]
    vocab += [(c, -8.0) for c in CHARS] + [("\u2581" + c, -7.0) for c in CHARS[:26]]
    return vocab


def spiece_model(vocab):
    """`sentencepiece_model.proto`'s ModelProto for `vocab`: pieces (1) with piece (1), score
    (2) and type (3: 2 unknown, 3 control, 1 normal), trainer_spec (2) with model_type (3:
    Unigram) and unk_id (40), normalizer_spec (3) named nmt_nfkc with no charsmap."""
    import struct

    def varint(n):
        out = bytearray()
        while True:
            b = n & 0x7F
            n >>= 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def field(tag, wire, payload):
        key = varint(tag << 3 | wire)
        if wire == 2:
            return key + varint(len(payload)) + payload
        return key + payload

    out = b""
    for piece, score in vocab:
        kind = {"<unk>": 2, "<pad>": 3, "</s>": 3}.get(piece, 1)
        body = (field(1, 2, piece.encode()) + field(2, 5, struct.pack("<f", score))
                + field(3, 0, varint(kind)))
        out += field(1, 2, body)
    out += field(2, 2, field(3, 0, varint(1)) + field(40, 0, varint(2)))
    out += field(3, 2, field(1, 2, b"nmt_nfkc"))
    return out


def t5_tokenizer():
    """A small SentencePiece-style Unigram tokenizer shaped as T5's (Metaspace, `</s>`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = t5_vocab()
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>", extra_ids=0, model_max_length=512)


def randomize(model, scale):
    """Random weights everywhere: default initialisations (zeros, ones) would hide a wrong
    modulation order or a missing norm weight."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return model.eval()


def build(tmp):
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel)
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config,
                              T5EncoderModel)

    sd = os.path.join(tmp, "sd15")
    subprocess.run(
        ["cargo", "run", "--quiet", "-p", "loraplane-trainer", "--bin", "trainer-bench", "--",
         "--write-tiny-model", sd, "--family", "sd15", "--seed", "9"],
        cwd=ROOT, check=True)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(sd, "tokenizer"))
    tokenizer_2 = t5_tokenizer()

    torch.manual_seed(SEED)
    transformer = randomize(FluxTransformer2DModel(**TRANSFORMER), 0.2)
    text_encoder = randomize(CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TRANSFORMER["pooled_projection_dim"],
        intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=16,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)), 0.2)
    text_encoder_2 = randomize(T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=TRANSFORMER["joint_attention_dim"], d_kv=8, d_ff=32,
        num_layers=2, num_heads=3, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6)), 0.3)
    vae = randomize(AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
        shift_factor=0.1159, sample_size=32), 0.1)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)


def references(pipe):
    import torch

    g = torch.Generator().manual_seed(SEED + 1)
    out = {}

    # The transformer on its own.
    t = pipe.transformer
    h, w = LATENT_HW
    tokens = (h // 2) * (w // 2)
    hidden = torch.randn(BATCH, tokens, TRANSFORMER["in_channels"], generator=g)
    text = torch.randn(BATCH, TEXT_TOKENS, TRANSFORMER["joint_attention_dim"], generator=g)
    pooled = torch.randn(BATCH, TRANSFORMER["pooled_projection_dim"], generator=g)
    sigma = torch.tensor([0.7, 0.25])
    guidance = torch.tensor([3.5, 1.0])
    ids_img, ids_txt = img_ids(h, w), torch.zeros(TEXT_TOKENS, 3)
    out["transformer.hidden_states"] = hidden
    out["transformer.encoder_hidden_states"] = text
    out["transformer.pooled_projections"] = pooled
    out["transformer.timestep"] = sigma
    out["transformer.guidance"] = guidance
    out["transformer.img_ids"] = ids_img
    out["transformer.txt_ids"] = ids_txt
    out["transformer.output"] = t(
        hidden_states=hidden, encoder_hidden_states=text, pooled_projections=pooled,
        timestep=sigma, img_ids=ids_img, txt_ids=ids_txt, guidance=guidance,
        return_dict=False)[0]
    out["rope.cos"], out["rope.sin"] = t.pos_embed(torch.cat([ids_txt, ids_img], dim=0))

    # The text encoders, through the tokenizers exactly as FluxPipeline calls them.
    t5_ids = pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=T5_MAX_LENGTH,
                              truncation=True, return_tensors="pt").input_ids
    out["t5.ids"] = t5_ids
    out["t5.hidden"] = pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0]
    clip_ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    out["clip.ids"] = clip_ids
    out["clip.pooled"] = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output

    # The autoencoder both ways.
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    out["vae.image"] = image
    out["vae.latent"] = pipe.vae.encode(image).latent_dist.mean
    z = torch.randn(1, LATENT_CHANNELS, 4, 4, generator=g)
    out["vae.z"] = z
    out["vae.decoded"] = pipe.vae.decode(z).sample

    # The whole render, as the trainer's previews do it.
    side = RENDER_SIZE // 8
    noise = torch.randn(1, LATENT_CHANNELS, side, side, generator=g)
    packed = noise.view(1, LATENT_CHANNELS, side // 2, 2, side // 2, 2).permute(0, 2, 4, 1, 3, 5)
    packed = packed.reshape(1, (side // 2) ** 2, LATENT_CHANNELS * 4)
    pipe.set_progress_bar_config(disable=True)
    out["render.noise"] = noise
    out["render.image"] = pipe(
        prompt=PROMPTS[0], height=RENDER_SIZE, width=RENDER_SIZE,
        num_inference_steps=RENDER_STEPS, guidance_scale=3.5, latents=packed,
        max_sequence_length=T5_MAX_LENGTH, output_type="pt").images
    return out


def main():
    import diffusers
    import torch
    import transformers
    from safetensors.torch import save_file

    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build(tmp)
        shutil.rmtree(OUT, ignore_errors=True)
        pipe.save_pretrained(OUT)
        os.makedirs(os.path.join(OUT, "spiece"))
        with open(os.path.join(OUT, "spiece", "spiece.model"), "wb") as f:
            f.write(spiece_model(t5_vocab()))
        tensors = references(pipe)
    save_file({k: v.contiguous().float() for k, v in tensors.items()},
              os.path.join(OUT, "reference.safetensors"),
              metadata={"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                        "torch": torch.__version__, "prompts": json.dumps(PROMPTS),
                        "t5_max_length": str(T5_MAX_LENGTH)})
    files = [os.path.join(d, f) for d, _, fs in os.walk(OUT) for f in fs]
    print(f"wrote {OUT}: {len(files)} files, {sum(os.path.getsize(f) for f in files)} bytes")


if __name__ == "__main__":
    main()
