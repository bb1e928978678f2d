"""KerasHub's own T5Gemma 2 presets (`keras_hub>T5Gemma2Backbone`) loaded into this package's classes.

Registered for that `registered_name` in `keras_t5gemma/conversion/__init__.py`, so
`from_preset` takes a folder written by KerasHub 0.32's `save_to_preset` or a
`kaggle://keras/t5gemma-2/keras/<name>` handle. The KerasHub config is
rewritten as a Hugging Face config and KerasHub's variables named by their
Hugging Face keys, so the loader's own path (`backbone_from_hf_config`,
`load_weights`, with its missing/unexpected-key checks) does the rest.

How KerasHub's model differs, and what loading does about it:
- It keeps separate encoder and decoder embedding tables (and end-of-image
  vectors) where the reference ties one. Equal copies (as KerasHub's own
  conversion writes them) load as the one table; when training made them
  differ, the decoder's (which also makes the logits) is used and a warning
  gives the largest difference.
- A text-only KerasHub model has no end-of-image vector and embeds that token
  from the table like any other; loading sets our vector to that scaled row,
  which computes the same.
- Soft-capping: KerasHub applies `attn_logit_softcapping` inside attention and
  never applies `final_logit_softcapping`; the reference (transformers 5.23)
  does the opposite. The fields are read as the reference reads them (a
  warning says so when attention soft-capping is set), so outputs match
  KerasHub's only where both are `None`, as in its released presets.
- Its image converter crops to the aspect ratio without antialiasing; ours
  stretches with antialiasing as the reference's processor does. Only the
  size, scale and offset are taken over.
- Its preprocessor's `add_start_token`/`add_end_token` and sequence lengths
  are kept.
"""

import inspect
import logging

import keras
import numpy as np
from keras_hub.models import T5Gemma2Backbone as KerasHubT5Gemma2Backbone

from keras_t5gemma.conversion.config import backbone_from_hf_config
from keras_t5gemma.conversion.quantized_loading import build_quantized
from keras_t5gemma.conversion.weights import load_weights
from keras_t5gemma.conversion.weights import weight_specs
from keras_t5gemma.layers.masks import FULL
from keras_t5gemma.layers.masks import SLIDING
from keras_t5gemma.models.t5gemma2.t5gemma2_backbone import T5Gemma2Backbone
from keras_t5gemma.models.t5gemma2.t5gemma2_tokenizer import IMAGE_PLACEHOLDER_ID
from keras_t5gemma.utils.keras_hub_compat import PresetLoader
from keras_t5gemma.utils.keras_hub_compat import check_file_exists
from keras_t5gemma.utils.keras_hub_compat import get_file
from keras_t5gemma.utils.keras_hub_compat import load_json
from keras_t5gemma.utils.loading import built_without_values
from keras_t5gemma.utils.loading import initialize_unfilled
from keras_t5gemma.utils.preset_utils import KerasPresetFolderLoader
from keras_t5gemma.utils.preset_utils import RoutedOptionsLoader

REGISTERED_NAME = "keras_hub>T5Gemma2Backbone"
VOCABULARY_FILE = "assets/tokenizer/vocabulary.spm"
_IMAGE_PLACEHOLDER_PIECE = "<image_soft_token>"
_PREPROCESSOR_SETTINGS = ("encoder_sequence_length", "decoder_sequence_length", "add_start_token", "add_end_token")
_TANH_GELU = ("gelu_approximate", "gelu_pytorch_tanh", "gelu_tanh")
# KerasHub gives full-attention layers this RoPE base whatever the config says.
_KERAS_HUB_GLOBAL_ROPE_WAVELENGTH = 1_000_000.0

logger = logging.getLogger(__name__)


def hf_config_from_keras_hub(config, image_token_id=IMAGE_PLACEHOLDER_ID):
    """A Hugging Face T5Gemma 2 `config.json` dict for KerasHub's `T5Gemma2Backbone` config."""
    if config["encoder_hidden_dim"] != config["decoder_hidden_dim"]:
        raise ValueError(
            f"The KerasHub preset has `encoder_hidden_dim` {config['encoder_hidden_dim']} and `decoder_hidden_dim` "
            f"{config['decoder_hidden_dim']}; T5Gemma 2 (here and in transformers) needs equal widths."
        )
    if config.get("hidden_activation", "gelu_approximate") not in _TANH_GELU:
        raise ValueError(f"Unsupported activation `{config['hidden_activation']}`; T5Gemma 2 uses tanh GeLU.")
    if not config.get("use_query_key_norm", True):
        raise ValueError("KerasHub presets without query/key norms (`use_query_key_norm=False`) are not supported.")

    def text(side, wavelength, factor):
        return {
            "vocab_size": config["vocabulary_size"],
            "hidden_size": config[f"{side}_hidden_dim"],
            "intermediate_size": config[f"{side}_intermediate_dim"],
            "num_hidden_layers": config[f"{side}_num_layers"],
            "num_attention_heads": config[f"{side}_num_attention_heads"],
            "num_key_value_heads": config[f"{side}_num_key_value_heads"],
            "head_dim": config[f"{side}_head_dim"],
            "layer_types": list(config[f"{side}_layer_types"]),
            "sliding_window": config.get("sliding_window") or 4096,
            "query_pre_attn_scalar": config.get("query_pre_attn_scalar", 1.0),
            "rms_norm_eps": config.get("rms_norm_eps", 1e-6),
            "hidden_activation": "gelu_pytorch_tanh",
            "attention_bias": config.get("attention_bias", False),
            "attn_logit_softcapping": config.get("attn_logit_softcapping"),
            "final_logit_softcapping": config.get("final_logit_softcapping"),
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": wavelength},
                FULL: {"rope_type": "linear", "factor": factor, "rope_theta": _KERAS_HUB_GLOBAL_ROPE_WAVELENGTH},
            },
        }

    wavelength = config.get("rope_max_wavelength", 10_000.0)
    factor = config.get("global_rope_scaling_factor", 1.0)
    encoder_wavelength = config.get("encoder_rope_max_wavelength") or wavelength
    encoder_factor = config.get("encoder_global_rope_scaling_factor") or factor
    encoder = {"text_config": text("encoder", encoder_wavelength, encoder_factor)}
    vision = config.get("vision_encoder")
    if vision is not None:
        vision = vision["config"]
        patches_per_side = vision["image_size"] // vision["patch_size"]
        encoder["vision_config"] = {
            "image_size": vision["image_size"],
            "patch_size": vision["patch_size"],
            "hidden_size": vision["hidden_dim"],
            "intermediate_size": vision["intermediate_dim"],
            "num_hidden_layers": vision["num_layers"],
            "num_attention_heads": vision["num_heads"],
            "layer_norm_eps": vision.get("layer_norm_epsilon", 1e-6),
        }
        encoder["mm_tokens_per_image"] = (patches_per_side // vision["pool_size"]) ** 2
    return {
        "model_type": "t5gemma2",
        "encoder": encoder,
        "decoder": text("decoder", wavelength, factor),
        "tie_word_embeddings": config.get("tie_word_embeddings", True),
        "dropout_rate": config.get("dropout_rate", 0.0),
        "attention_dropout": config.get("attention_dropout", 0.0),
        "eoi_token_index": config.get("eoi_token_index", 256_000),
        "image_token_index": image_token_id,
    }


def _text_layer_variables(layer, attention, prefix):
    yield f"{prefix}.self_attn.q_proj.weight", attention.query_dense.kernel
    yield f"{prefix}.self_attn.k_proj.weight", attention.key_dense.kernel
    yield f"{prefix}.self_attn.v_proj.weight", attention.value_dense.kernel
    yield f"{prefix}.self_attn.o_proj.weight", attention.output_dense.kernel
    yield f"{prefix}.self_attn.q_norm.weight", attention.query_norm.scale
    yield f"{prefix}.self_attn.k_norm.weight", attention.key_norm.scale
    yield f"{prefix}.mlp.gate_proj.weight", layer.mlp.gate_proj.kernel
    yield f"{prefix}.mlp.up_proj.weight", layer.mlp.up_proj.kernel
    yield f"{prefix}.mlp.down_proj.weight", layer.mlp.down_proj.kernel
    for norm in ("pre_self_attn_layernorm", "post_self_attn_layernorm", "pre_feedforward_layernorm"):
        yield f"{prefix}.{norm}.weight", getattr(layer, norm).scale
    yield f"{prefix}.post_feedforward_layernorm.weight", layer.post_feedforward_layernorm.scale


def _vision_variables(vision_encoder, prefix):
    image_encoder = vision_encoder.get_layer("image_encoder")
    embeddings = image_encoder.vision_embeddings
    yield f"{prefix}.vision_tower.embeddings.patch_embedding.weight", embeddings.patch_embedding.kernel
    yield f"{prefix}.vision_tower.embeddings.patch_embedding.bias", embeddings.patch_embedding.bias
    yield f"{prefix}.vision_tower.embeddings.position_embedding.weight", embeddings.position_embedding.embeddings
    for i, block in enumerate(image_encoder.resblocks):
        layer_prefix = f"{prefix}.vision_tower.encoder.layers.{i}"
        for ours, theirs in (("q_proj", "query_proj"), ("k_proj", "key_proj"), ("v_proj", "value_proj")):
            yield f"{layer_prefix}.self_attn.{ours}.weight", getattr(block.attn, theirs).kernel
            yield f"{layer_prefix}.self_attn.{ours}.bias", getattr(block.attn, theirs).bias
        yield f"{layer_prefix}.self_attn.out_proj.weight", block.attn.out_proj.kernel
        yield f"{layer_prefix}.self_attn.out_proj.bias", block.attn.out_proj.bias
        for norm in ("1", "2"):
            yield f"{layer_prefix}.layer_norm{norm}.weight", getattr(block, f"layer_norm_{norm}").gamma
            yield f"{layer_prefix}.layer_norm{norm}.bias", getattr(block, f"layer_norm_{norm}").beta
        for fc in ("1", "2"):
            yield f"{layer_prefix}.mlp.fc{fc}.weight", getattr(block, f"mlp_dense_{fc}").kernel
            yield f"{layer_prefix}.mlp.fc{fc}.bias", getattr(block, f"mlp_dense_{fc}").bias
    yield f"{prefix}.vision_tower.post_layernorm.weight", image_encoder.encoder_layer_norm.gamma
    yield f"{prefix}.vision_tower.post_layernorm.bias", image_encoder.encoder_layer_norm.beta
    output = vision_encoder.get_layer("vision_output_encoder")
    yield f"{prefix}.multi_modal_projector.mm_soft_emb_norm.weight", output.vision_soft_embedding_norm.scale
    yield f"{prefix}.multi_modal_projector.mm_input_projection_weight", output.vision_input_projection.kernel


def _numpy(variable):
    return keras.ops.convert_to_numpy(variable)


def _tied(name, encoder_copy, decoder_copy):
    """The one tensor for KerasHub's two copies: the decoder's, with a warning if they differ."""
    if not np.array_equal(encoder_copy, decoder_copy):
        difference = float(np.max(np.abs(encoder_copy.astype("float32") - decoder_copy.astype("float32"))))
        logger.warning(
            "The KerasHub preset's encoder and decoder %s differ (largest difference %.3g); T5Gemma 2 ties "
            "them, so the decoder's copy (which also makes the logits) is used for the encoder too.",
            name,
            difference,
        )
    return decoder_copy


def keras_hub_tensors(keras_hub_backbone):
    """`{Hugging Face key: array}` of a KerasHub `T5Gemma2Backbone`, in KerasHub's (Keras) layouts."""
    tensors = {}
    table = _tied(
        "embedding tables",
        _numpy(keras_hub_backbone.token_embedding.embeddings),
        _numpy(keras_hub_backbone.decoder_token_embedding.embeddings),
    )
    tensors["model.encoder.embed_tokens.weight"] = table
    if keras_hub_backbone.vision_encoder is not None:
        tensors["model.encoder.embed_tokens.eoi_embedding"] = _tied(
            "end-of-image embeddings",
            _numpy(keras_hub_backbone.encoder_eoi_embedding),
            _numpy(keras_hub_backbone.decoder_eoi_embedding),
        )
    else:
        # Without a vision encoder KerasHub embeds the end-of-image token like any other: the scaled row.
        eoi = keras_hub_backbone.eoi_token_index
        if eoi < table.shape[0]:
            scale = np.sqrt(np.float32(table.shape[1])).astype(table.dtype)
            tensors["model.encoder.embed_tokens.eoi_embedding"] = table[eoi] * scale
        else:
            tensors["model.encoder.embed_tokens.eoi_embedding"] = np.zeros(table.shape[1], table.dtype)
    for side in ("encoder", "decoder"):
        for i in range(getattr(keras_hub_backbone, f"{side}_num_layers")):
            layer = keras_hub_backbone.get_layer(f"{side}_layer_{i}")
            attention = layer.self_attn if side == "encoder" else layer.merged_attn
            for key, variable in _text_layer_variables(layer, attention, f"model.{side}.layers.{i}"):
                tensors[key] = _numpy(variable)
    tensors["model.encoder.norm.weight"] = _numpy(keras_hub_backbone.encoder_norm.scale)
    tensors["model.decoder.norm.weight"] = _numpy(keras_hub_backbone.decoder_norm.scale)
    if keras_hub_backbone.vision_encoder is not None:
        for key, variable in _vision_variables(keras_hub_backbone.vision_encoder, "model.encoder"):
            tensors[key] = _numpy(variable)
    return tensors


class KerasHubT5Gemma2PresetLoader(RoutedOptionsLoader, PresetLoader):
    """Builds this package's classes from a preset saved by KerasHub's `T5Gemma2Backbone`/`T5Gemma2Seq2SeqLM`.

    `load_backbone` takes the backbone options as for Hugging Face
    checkpoints (KerasHub's float model is read first, so `quantize` saves
    no memory here).
    """

    def check_backbone_class(self):
        return T5Gemma2Backbone

    def _image_token_id(self):
        if check_file_exists(self.preset, VOCABULARY_FILE):
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            with open(get_file(self.preset, VOCABULARY_FILE), "rb") as file:
                proto.ParseFromString(file.read())
            for i, piece in enumerate(proto.pieces):
                if piece.piece == _IMAGE_PLACEHOLDER_PIECE:
                    return i
        return IMAGE_PLACEHOLDER_ID

    def hf_config(self):
        return hf_config_from_keras_hub(self.config["config"], self._image_token_id())

    def load_backbone(
        self,
        cls,
        load_weights_=True,
        text_only=False,
        encoder_only=False,
        dtype=None,
        quantize=None,
        remat=False,
        progress=None,
        **kwargs,
    ):
        if kwargs:
            raise ValueError(f"Unexpected arguments for a KerasHub T5Gemma 2 preset: {sorted(kwargs)}.")
        config = self.hf_config()

        def build():
            return build_quantized(
                lambda policy: backbone_from_hf_config(
                    config, text_only=text_only, encoder_only=encoder_only, dtype=policy, cls=cls, remat=remat
                ),
                dtype,
                quantize,
            )

        backbone = built_without_values(build) if load_weights_ else build()
        if load_weights_:
            # Built without values and filled by its weights file: none of KerasHub's initializers runs.
            source = KerasPresetFolderLoader(self.preset, self.config).load_backbone(
                KerasHubT5Gemma2Backbone, True, dtype=dtype
            )
            tensors = keras_hub_tensors(source)
            del source
            # KerasHub's kernels are Keras kernels like ours; the table's `to_checkpoint` writes them in
            # the checkpoint layout that `load_weights` (and its key checks) reads.
            specs = {spec.key: spec for spec in weight_specs(backbone)}

            def read(key):
                # Each tensor is read once: dropping it frees KerasHub's copy as ours is filled.
                tensor = tensors.pop(key)
                return specs[key].to_checkpoint(tensor) if key in specs else tensor

            load_weights(backbone, list(tensors), read, progress=progress)
            initialize_unfilled(backbone)
        return backbone

    def load_tokenizer(self, cls, config_file="tokenizer.json", **kwargs):
        config = load_json(self.preset, config_file)["config"]
        proto = get_file(self.preset, VOCABULARY_FILE)
        for name in ("sequence_length", "add_bos", "add_eos"):
            if name in config and name not in kwargs:
                kwargs[name] = config[name]
        return cls(proto=proto, image_placeholder=self._image_token_id(), **kwargs)

    def load_image_converter(self, cls, **kwargs):
        if self.config["config"].get("vision_encoder") is None:
            return None
        if check_file_exists(self.preset, "image_converter.json"):
            config = load_json(self.preset, "image_converter.json")["config"]
            settings = {name: config[name] for name in ("image_size", "scale", "offset") if name in config}
        else:
            size = self.config["config"]["vision_encoder"]["config"]["image_size"]
            settings = {"image_size": (size, size)}
        return cls(**{**settings, **kwargs})

    def load_preprocessor(self, cls, config_file="preprocessor.json", **kwargs):
        kwargs = cls._add_missing_kwargs(self, kwargs)
        saved = load_json(self.preset, config_file)["config"] if check_file_exists(self.preset, config_file) else {}
        settings = {name: saved[name] for name in _PREPROCESSOR_SETTINGS if name in saved}
        if "encoder_sequence_length" in saved:
            settings["sequence_length"] = saved["encoder_sequence_length"]  # the embedder's name for it
        encoder = self.hf_config()["encoder"]
        if "mm_tokens_per_image" in encoder:
            settings["mm_tokens_per_image"] = encoder["mm_tokens_per_image"]
        accepted = inspect.signature(cls.__init__).parameters
        for name, value in settings.items():
            if name in accepted:
                kwargs.setdefault(name, value)
        return cls(**kwargs)
