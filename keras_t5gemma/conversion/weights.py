"""Which Hugging Face tensor fills which backbone variable, and how.

Keys follow the layout `transformers` 5.23 writes (`model.encoder.layers.N...`,
`model.encoder.vision_tower.encoder...`). Checkpoints of earlier releases are
brought to it by `canonical_key` before lookup.
"""

import dataclasses
import math
import re

import keras
import numpy as np

from keras_t5gemma.conversion.quantized_loading import assign_by_name
from keras_t5gemma.conversion.quantized_loading import float_weight
from keras_t5gemma.conversion.quantized_loading import quantized_layers
from keras_t5gemma.conversion.quantized_loading import quantized_values
from keras_t5gemma.utils.loading import fill
from keras_t5gemma.utils.loading import read_in_parts

# torch Linear weights are `[out, in]`; Keras kernels are `[in, ...out]`.
LINEAR = (1, 0)
# torch Conv2d weights are `[out, in, kh, kw]`; Keras Conv2D kernels are `[kh, kw, in, out]`.
CONV2D = (2, 3, 1, 0)

_LEGACY_PREFIXES = (
    # Earlier releases nested the vision transformer one level deeper.
    (re.compile(r"vision_tower\.vision_model\."), "vision_tower."),
    # The in-memory module path of the text encoder, as `state_dict()` spells it.
    (re.compile(r"encoder\.text_model\."), "encoder."),
)


def canonical_key(key):
    """Maps any supported spelling of a checkpoint key to the 5.23 on-disk one."""
    for pattern, replacement in _LEGACY_PREFIXES:
        key = pattern.sub(replacement, key)
    return key


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One variable, the checkpoint key that fills it, and the axis permutation.

    `input_axes` says how many leading axes of a `LINEAR` kernel make the
    torch `in` dimension (2 for the attention output kernel `(N, H, D)`), so
    that `to_checkpoint` can rebuild the checkpoint's `[out, in]` matrix.

    `part`, `(axis, start, stop)`, says that the tensor fills only
    `variable[..., start:stop, ...]` along `axis` (a fused kernel holding
    several checkpoint tensors, such as the MLP's gate and up projections);
    every shape below is then the part's.
    """

    variable: object
    key: str
    permutation: tuple = None
    input_axes: int = 1
    part: tuple = None

    @property
    def shape(self):
        """The shape this tensor fills: the variable's, or its part's."""
        shape = tuple(self.variable.shape)
        if self.part is None:
            return shape
        axis, start, stop = self.part
        return (*shape[:axis], stop - start, *shape[axis + 1 :])

    @property
    def index(self):
        """The variable's slices this tensor fills."""
        if self.part is None:
            return (slice(None),) * len(self.variable.shape)
        axis, start, stop = self.part
        return (*(slice(None),) * axis, slice(start, stop))

    def value(self):
        """The variable's value this tensor holds (its part of it), as a NumPy array in the variable's layout."""
        return np.asarray(keras.ops.convert_to_numpy(self.variable))[self.index]

    def to_checkpoint(self, array):
        """The inverse of `convert`: a value of `shape` (or one holding as many elements) in the checkpoint's layout."""
        array = np.asarray(array)
        if array.shape != self.shape and array.size == math.prod(self.shape):
            array = array.reshape(self.shape)
        if self.permutation == LINEAR and array.ndim > 2:
            # Merge the head axes; a 2-D kernel (KerasHub's vision projections) is already `[in, out]`.
            split = self.input_axes
            array = array.reshape(int(np.prod(array.shape[:split])), int(np.prod(array.shape[split:])))
        elif self.key.endswith(".bias"):
            # Per-head biases `(N, H)` are stored flat.
            array = array.reshape(-1)
        if self.permutation is not None:
            array = np.transpose(array, np.argsort(self.permutation))
        return array

    def expected_shape(self, rank):
        """The checkpoint tensor's shape after `permutation`, for a tensor of `rank` axes.

        The variable's shape, with its head axes merged as torch stores them:
        `LINEAR` weights as `(inputs, outputs)`, a rank-1 tensor for a
        multi-axis variable (a bias `(heads, head_dim)`) as one axis.
        """
        target = self.shape
        if self.permutation == LINEAR and len(target) > 2:
            return (math.prod(target[: self.input_axes]), math.prod(target[self.input_axes :]))
        if rank == 1 and len(target) > 1 and self.permutation is None:
            return (math.prod(target),)
        return target

    def check_shape(self, shape):
        """Refuses a checkpoint tensor of `shape` (as stored) that does not fit the variable."""
        shape = tuple(shape)
        if self.permutation is not None:
            if len(shape) != len(self.permutation):
                raise ValueError(
                    f"Checkpoint tensor `{self.key}` has shape {shape}; expected {len(self.permutation)} "
                    f"axes for variable `{self.variable.path}` of shape {self._described_shape()}."
                )
            shape = tuple(shape[axis] for axis in self.permutation)
        expected = self.expected_shape(len(shape))
        if shape != expected:
            raise ValueError(
                f"Checkpoint tensor `{self.key}` has shape {self._stored(shape)}, which does not fit "
                f"variable `{self.variable.path}` of shape {self._described_shape()} (it needs "
                f"{self._stored(expected)}). Does the config match the weights (or is the tensor transposed)?"
            )

    def _described_shape(self):
        shape = tuple(self.variable.shape)
        if self.part is None:
            return shape
        axis, start, stop = self.part
        return f"{shape}, of which it fills {start}:{stop} along axis {axis}"

    def convert(self, array):
        """`array` in the variable's layout; refuses any other shape, and integer tensors.

        Every variable is filled from float weights: an int8 variable of a
        quantized layer too (`assign_weights` quantizes them).
        """
        array = self.checked(array)
        if self.permutation is not None:
            array = np.transpose(array, self.permutation)
        return array.reshape(self.shape)

    def checked(self, array, leading=0):
        """`array` as stored, refused if it is not a float tensor of this spec's stored shape (after `leading` axes)."""
        array = np.asarray(array)
        self._check_float(array)
        self.check_shape(array.shape[leading:])
        return array

    def _check_float(self, array):
        if array.dtype.kind in "iub":
            raise ValueError(
                f"Checkpoint tensor `{self.key}` holds {array.dtype} values; variable "
                f"`{self.variable.path}` is filled from float weights. Is the file damaged?"
            )

    def convert_part(self, read_part, stored_shape, index):
        """The variable's part `index` (a tuple of slices), reading only the checkpoint bytes that hold it.

        Args:
            read_part: callable `(stored_index) -> array`, a part of the
                checkpoint tensor in its stored layout.
            stored_shape: the checkpoint tensor's shape.
            index: the part of the variable, one slice per axis (of
                `shape`: within this tensor's `part`).

        A variable axis made by merging checkpoint axes (heads and head size
        stored as one torch axis) is cut out of the checkpoint where it is the
        outermost of the merged ones or the others are whole; otherwise that
        stored axis is read whole and cut after (never the case for the
        layout map's splits).
        """
        self.check_shape(stored_shape)
        target = self.shape
        permutation = self.permutation or tuple(range(len(stored_shape)))
        permuted = tuple(stored_shape[axis] for axis in permutation)
        ranges = [index[axis].indices(size)[:2] for axis, size in enumerate(target)]
        stored_parts, read_shape, rest = [], [], []
        for axes in _merged_axes(permuted, target):
            # Axes of size 1 (a part's place in a fused kernel) change no offsets.
            sized = [axis for axis in axes if target[axis] != 1] or [axes[0]]
            first, inner = sized[0], sized[1:]
            if all(ranges[axis] == (0, target[axis]) for axis in axes if axis != first):
                start, stop = ranges[first]
                inner_size = math.prod(target[axis] for axis in inner)
                stored_parts.append(slice(start * inner_size, stop * inner_size))
                read_shape.extend(stop - start if axis == first else target[axis] for axis in axes)
                rest.extend(slice(None) for _ in axes)
            else:
                stored_parts.append(slice(None))
                read_shape.extend(target[axis] for axis in axes)
                rest.extend(slice(*ranges[axis]) for axis in axes)
        stored_index = [None] * len(permutation)
        for position, axis in enumerate(permutation):
            stored_index[axis] = stored_parts[position]
        array = np.asarray(read_part(tuple(stored_index)))
        self._check_float(array)
        return np.transpose(array, permutation).reshape(read_shape)[tuple(rest)]

    def _stored(self, shape):
        """`shape` (in the variable's axis order) as the checkpoint stores it."""
        if self.permutation is None:
            return tuple(shape)
        return tuple(shape[self.permutation.index(axis)] for axis in range(len(shape)))


def _merged_axes(stored, target):
    """For each axis of `stored`, the axes of `target` (the same elements, reshaped) that make it."""
    groups, axis = [], 0
    for size in stored:
        group, product = [axis], target[axis]
        axis += 1
        while product != size:
            group.append(axis)
            product *= target[axis]
            axis += 1
        groups.append(tuple(group))
    return groups


def _text_layer_specs(layer, prefix):
    attention = layer.attention
    yield WeightSpec(layer.pre_attention_norm.scale, f"{prefix}.pre_self_attn_layernorm.weight")
    yield WeightSpec(layer.post_attention_norm.scale, f"{prefix}.post_self_attn_layernorm.weight")
    yield WeightSpec(layer.pre_feedforward_norm.scale, f"{prefix}.pre_feedforward_layernorm.weight")
    yield WeightSpec(layer.post_feedforward_norm.scale, f"{prefix}.post_feedforward_layernorm.weight")
    yield from query_key_value_specs(attention, f"{prefix}.self_attn")
    yield WeightSpec(float_weight(attention.output_dense), f"{prefix}.self_attn.o_proj.weight", LINEAR, input_axes=2)
    yield WeightSpec(attention.query_norm.scale, f"{prefix}.self_attn.q_norm.weight")
    yield WeightSpec(attention.key_norm.scale, f"{prefix}.self_attn.k_norm.weight")
    yield from gate_up_specs(layer.feedforward, f"{prefix}.mlp")
    yield WeightSpec(float_weight(layer.feedforward.down_dense), f"{prefix}.mlp.down_proj.weight", LINEAR)


def query_key_value_specs(attention, prefix, bias=False):
    """`q_proj`, `k_proj` and `v_proj` (and their biases), each filling its part of `query_key_value`.

    The fused kernel is `(D, N + 2K, H)`: the query heads, then the key
    heads, then the value heads along axis 1 (a bias `(N + 2K, H)`: axis 0).
    """
    dense = attention.query_key_value_dense
    kernel = float_weight(dense)
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        start, stop = dense.part_span(i)
        yield WeightSpec(kernel, f"{prefix}.{name}.weight", LINEAR, part=(1, start, stop))
        if bias:
            yield WeightSpec(dense.bias, f"{prefix}.{name}.bias", part=(0, start, stop))


def gate_up_specs(feedforward, prefix):
    """The gate and up projections' tensors, each filling its part of the fused `gate_up` kernel `(D, 2, I)`."""
    kernel = float_weight(feedforward.gate_up_dense)
    for i, name in enumerate(("gate_proj", "up_proj")):
        yield WeightSpec(kernel, f"{prefix}.{name}.weight", LINEAR, part=(1, i, i + 1))


def _dense_specs(layer, prefix, permutation=LINEAR, input_axes=1):
    yield WeightSpec(float_weight(layer), f"{prefix}.weight", permutation, input_axes)
    yield WeightSpec(layer.bias, f"{prefix}.bias")


def _layer_norm_specs(layer, prefix):
    yield WeightSpec(layer.gamma, f"{prefix}.weight")
    yield WeightSpec(layer.beta, f"{prefix}.bias")


def _vision_specs(vision, prefix):
    yield from _dense_specs(vision.patch_embedding, f"{prefix}.vision_tower.embeddings.patch_embedding", CONV2D)
    yield WeightSpec(vision.position_embedding, f"{prefix}.vision_tower.embeddings.position_embedding.weight")
    for i, layer in enumerate(vision.vision_layers):
        layer_prefix = f"{prefix}.vision_tower.encoder.layers.{i}"
        attention = layer.attention
        yield from _layer_norm_specs(layer.attention_norm, f"{layer_prefix}.layer_norm1")
        yield from query_key_value_specs(attention, f"{layer_prefix}.self_attn", bias=True)
        yield from _dense_specs(attention.output_dense, f"{layer_prefix}.self_attn.out_proj", input_axes=2)
        yield from _layer_norm_specs(layer.feedforward_norm, f"{layer_prefix}.layer_norm2")
        yield from _dense_specs(layer.feedforward.up_dense, f"{layer_prefix}.mlp.fc1")
        yield from _dense_specs(layer.feedforward.down_dense, f"{layer_prefix}.mlp.fc2")
    yield from _layer_norm_specs(vision.final_norm, f"{prefix}.vision_tower.post_layernorm")
    # The projection is stored `[vision, text]`, already the Keras kernel layout.
    yield WeightSpec(float_weight(vision.projection), f"{prefix}.multi_modal_projector.mm_input_projection_weight")
    yield WeightSpec(vision.projector_norm.scale, f"{prefix}.multi_modal_projector.mm_soft_emb_norm.weight")


def weight_specs(backbone):
    """Every variable of `backbone` with the checkpoint key that fills it."""
    embedding = backbone.token_embedding
    yield WeightSpec(float_weight(embedding.table, "embeddings"), "model.encoder.embed_tokens.weight")
    yield WeightSpec(embedding.eoi_embedding, "model.encoder.embed_tokens.eoi_embedding")
    for side, stack in (("encoder", backbone.encoder), ("decoder", backbone.decoder)):
        if stack is None:
            continue
        for i, layer in enumerate(stack.transformer_layers):
            yield from _text_layer_specs(layer, f"model.{side}.layers.{i}")
        yield WeightSpec(stack.final_norm.scale, f"model.{side}.norm.weight")
    if backbone.vision_encoder is not None:
        yield from _vision_specs(backbone.vision_encoder, "model.encoder")


# Checkpoint tensors that carry no information for the backbone: copies of the
# tied embedding, the SigLIP pooling head the projector does not use, and a
# classification head (read by `load_classifier_head`).
_IGNORED = re.compile(
    r"^(model\.decoder\.embed_tokens\.(weight|eoi_embedding)|lm_head\.out_proj\.weight"
    r"|model\.encoder\.vision_tower\.head\..*|score\.out_proj\.(weight|bias))$"
)
# The classification head of `T5Gemma2ForSequenceClassification` / `...ForTokenClassification`.
CLASSIFIER_HEAD_KEY = "score.out_proj"


# Tensors of parts a backbone may leave out: the vision tower (text-only) and
# the decoder (encoder-only).
_VISION = re.compile(r"^model\.encoder\.(vision_tower|multi_modal_projector)\.")
_DECODER = re.compile(r"^model\.decoder\.")


def load_weights(backbone, keys, reader, progress=None):
    """Assigns every `T5Gemma2Backbone` variable from a checkpoint.

    Args:
        backbone: a `T5Gemma2Backbone`.
        keys: iterable of the checkpoint's keys, in any supported spelling.
        reader: a `TensorReader`, or a callable key -> array (a key as
            spelled in `keys`).
        progress: optional callable advanced by one per assigned tensor.

    Raises:
        ValueError: naming missing or unexpected tensors, or a shape mismatch.
    """
    left_out = [_IGNORED]
    if backbone.vision_encoder is None:
        left_out.append(_VISION)
    if backbone.decoder is None:
        left_out.append(_DECODER)
    assign_weights(
        list(weight_specs(backbone)),
        keys,
        reader,
        left_out,
        progress=progress,
        model_name="a T5Gemma 2 checkpoint matching its config (and does it include the vision tower, if the "
        "config has one)",
        quantized=quantized_layers(backbone),
    )


class TensorReader:
    """The checkpoint a weights table reads: whole tensors by key, and whatever more its source can do.

    Made from `get_tensor` (key -> array), it reads whole tensors only. A
    reader of files (`preset_loader`) overrides the rest: `read_part(key,
    index)` (`index` in the stored layout) and `shape(key)` when
    `reads_parts`, so that a variable laid out over devices gets only its
    devices' parts read (`utils.loading.fill`); `plan(keys)`, told before
    the first read the keys `read` will be asked for, in that order, to fetch
    each while the one before is converted (`checkpoint.ReadAhead`); and
    `read_stacked(keys)`, tensors of one shape stored back to back as one
    array `(len(keys), *shape)`.
    """

    reads_parts = False

    def __init__(self, get_tensor=None):
        self._get_tensor = get_tensor

    def read(self, key):
        return self._get_tensor(key)

    def read_part(self, key, index):
        raise NotImplementedError(f"{type(self).__name__} reads whole tensors only.")

    def shape(self, key):
        raise NotImplementedError(f"{type(self).__name__} reads whole tensors only.")

    def plan(self, keys):
        """Told the keys `read` will be asked for, in that order (nothing to do here)."""

    def read_stacked(self, keys):
        """The tensors `keys` as one array where the source holds them so, else `None` (here always)."""
        return None

    def renamed(self, on_disk):
        """This reader with every key passed through `on_disk` first."""
        return _RenamedReader(self, on_disk)


class _RenamedReader(TensorReader):
    def __init__(self, reader, on_disk):
        super().__init__()
        self._reader, self._on_disk = reader, on_disk
        self.reads_parts = reader.reads_parts

    def read(self, key):
        return self._reader.read(self._on_disk(key))

    def read_part(self, key, index):
        return self._reader.read_part(self._on_disk(key), index)

    def shape(self, key):
        return self._reader.shape(self._on_disk(key))

    def plan(self, keys):
        self._reader.plan([self._on_disk(key) for key in keys])

    def read_stacked(self, keys):
        return self._reader.read_stacked([self._on_disk(key) for key in keys])


def tensor_reader(reader):
    """`reader` as a `TensorReader`: itself, or a callable key -> array made one."""
    return reader if isinstance(reader, TensorReader) else TensorReader(reader)


def assign_weights(
    specs, keys, reader, left_out, progress=None, model_name="a checkpoint matching its config", quantized=None
):
    """Assigns each `WeightSpec`'s variable from the checkpoint tensor it names.

    Args:
        specs: list of `WeightSpec`.
        keys: iterable of the checkpoint's keys, in any supported spelling.
        reader: a `TensorReader` (parts, read-ahead and stacked reads where
            it has them), or a callable key -> array (a key as spelled in
            `keys`).
        left_out: compiled patterns of checkpoint keys the model has no place
            for on purpose (tied copies, parts not built).
        progress: optional callable advanced by one per assigned tensor.
        model_name: what the checkpoint should be, for the error message.
        quantized: `{id(variable): layer}` of the model's quantized variables
            (`quantized_loading.quantized_layers`); each is filled with its
            float tensor quantized as `layer.quantize` would.

    Raises:
        ValueError: naming missing or unexpected tensors, or a shape mismatch.
    """
    by_canonical = {canonical_key(key): key for key in keys}
    expected = {spec.key for spec in specs}
    missing = sorted(expected - set(by_canonical))
    if missing:
        raise ValueError(
            f"The checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}. Is it {model_name}?"
        )
    unexpected = sorted(key for key in by_canonical if key not in expected and not any(p.match(key) for p in left_out))
    if unexpected:
        raise ValueError(
            f"The checkpoint has {len(unexpected)} tensors this model has no place for, "
            f"e.g. {unexpected[:5]}. Does the config match the weights?"
        )
    reader = tensor_reader(reader)
    quantized = quantized or {}
    groups = _by_variable(specs)
    reader.plan(
        [
            by_canonical[spec.key]
            for group in groups
            if not reader.reads_parts or id(group[0].variable) in quantized or not read_in_parts(group[0].variable)
            for spec in group
        ]
    )
    for group in groups:
        variable = group[0].variable
        keys = [by_canonical[spec.key] for spec in group]
        whole = (slice(None),) * len(variable.shape)

        def read(group=group, keys=keys, whole=whole):
            stacked = _stacked_as_stored(group, keys, reader)
            if stacked is not None:
                return stacked
            return _assembled(group, keys, whole, lambda spec, key, _: spec.convert(reader.read(key)))

        layer = quantized.get(id(variable))
        if layer is not None:
            # The float tensor is never named here, so it is freed before the int8 values are assigned.
            assign_by_name(layer, quantized_values(layer, variable.name, read()))
        else:
            fill(variable, read, _part_reader(group, keys, reader))
        if progress is not None:
            progress(len(group))


def _by_variable(specs):
    """`specs` in groups filling one variable each (a fused kernel's parts together), in table order."""
    groups = {}
    for spec in specs:
        groups.setdefault(id(spec.variable), []).append(spec)
    return list(groups.values())


def _assembled(group, keys, index, read):
    """The slices `index` of the variable `group` fills, from each tensor's share.

    `read(spec, key, within)` gives tensor `key`'s share (`within`: `index`
    in its part's coordinates). A variable filled by one whole tensor is that
    share as read; parts are placed one at a time into one array.
    """
    shape = tuple(len(range(*s.indices(size))) for s, size in zip(index, group[0].variable.shape))
    result = None
    for spec, key in zip(group, keys):
        within = _within(spec, index)
        if within is None:
            continue
        piece = read(spec, key, within)
        if spec.part is None:
            return piece
        if result is None:
            result = np.empty(shape, piece.dtype)
        axis, start, _ = spec.part
        first = index[axis].indices(spec.variable.shape[axis])[0]
        offset = max(first, start) - first
        result[(*(slice(None),) * axis, slice(offset, offset + piece.shape[axis]))] = piece
    return result


def _stacked_as_stored(group, keys, reader):
    """A fused variable whose tensors each fill one index of its part axis, or `None` for any other.

    The tensors are copied side by side as stored (plain copies), and the
    result is a view of that stack in the variable's layout: the one
    transposition is left to the copy into the model (`utils.loading.fill`,
    which JAX does blockwise), instead of placing each tensor transposed
    with NumPy (the fused gate/up kernel of a 4b-4b load: 16 s of 40 s).
    Tensors the reader's `read_stacked` gives as one array (stored back to
    back) are not copied at all before that.
    """
    if len(group) < 2 or any(spec.part is None or spec.part[2] - spec.part[1] != 1 for spec in group):
        return None
    axis = group[0].part[0]
    if sorted(spec.part[1] for spec in group) != list(range(group[0].variable.shape[axis])):
        return None
    permutation = group[0].permutation or tuple(range(len(group[0].shape) - 1))
    for spec in group:
        # The stored tensor, permuted, must be the part with its axis left out (no head axes merged).
        converted = spec.expected_shape(len(permutation))
        if (
            spec.permutation not in (None, group[0].permutation)
            or converted[:axis] + (1,) + converted[axis:] != spec.shape
        ):
            return None
    order = [1 + stored for stored in permutation]
    order = order[:axis] + [0] + order[axis:]
    in_place = sorted(zip(group, keys), key=lambda pair: pair[0].part[1])
    stacked = reader.read_stacked([key for _, key in in_place])
    if stacked is not None:
        for spec, _ in in_place:
            stacked = spec.checked(stacked, leading=1)
        return stacked.transpose(order)
    for spec, key in zip(group, keys):
        array = spec.checked(reader.read(key))
        if stacked is None:
            stacked = np.empty((len(group), *array.shape), array.dtype)
        elif np.result_type(stacked, array) != stacked.dtype:
            stacked = stacked.astype(np.result_type(stacked, array))  # tensors stored in different precisions
        stacked[spec.part[1]] = array
        del array
    return stacked.transpose(order)


def _part_reader(group, keys, reader):
    """`index -> the variable's part`, reading only what the tensors hold of it; `None` if `reader` reads no parts."""
    if not reader.reads_parts:
        return None

    def read(spec, key, within):
        return spec.convert_part(lambda stored: reader.read_part(key, stored), reader.shape(key), within)

    return lambda index: _assembled(group, keys, index, read)


def _within(spec, index):
    """`index` (of the variable) in `spec`'s part's coordinates; `None` if it holds none of the part."""
    if spec.part is None:
        return index
    axis, start, stop = spec.part
    low, high = index[axis].indices(spec.variable.shape[axis])[:2]
    low, high = max(low, start), min(high, stop)
    if low >= high:
        return None
    return (*index[:axis], slice(low - start, high - start), *index[axis + 1 :])


def classifier_head_specs(classifier):
    """The `WeightSpec`s of a classifier's projection, as `score.out_proj.weight` and `.bias`."""
    return list(_dense_specs(classifier.output_dense, CLASSIFIER_HEAD_KEY))


def load_classifier_head(classifier, keys, get_tensor):
    """Assigns a classifier's projection from the checkpoint's `score.out_proj` tensors.

    Raises:
        ValueError: if the checkpoint has no head, or one of another size.
    """
    keys = set(keys)
    specs = classifier_head_specs(classifier)
    missing = sorted(spec.key for spec in specs if spec.key not in keys)
    if missing:
        raise ValueError(f"The checkpoint has no classification head: it lacks {missing}.")
    for spec in specs:
        fill(spec.variable, lambda: spec.convert(get_tensor(spec.key)))
