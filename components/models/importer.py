"""Import a pretrained causal LM into a model artifact in transformers format.

Invariant: the artifact computes exactly what the source computes. Its weights are the
source's (a GGUF's dequantised to float32), so `AutoModelForCausalLM.from_pretrained` of the
artifact gives the source's logits bit for bit; the build reloads what it saved and refuses
to publish on any difference (`reload_max_abs_logit_diff` in the metrics, always 0.0).

Sources: a GGUF file (llama.cpp's format, read by transformers' GGUF loader), or a directory
holding `config.json`, safetensors weights (`save_pretrained`'s or a bare state dict written
with `safetensors.torch.save_file`) and a tokenizer. Pickled weights (`pytorch_model.bin`)
are refused: loading a pickle runs code. The source is the component's one input, so its
content hash (sha256 of a file's bytes, or of a directory's files) is in the manifest's
`inputs.source` as a raw input, and lineage walks back to it.

Every problem with the source is one `DataError` line naming the file and what is wrong,
raised before anything is published: an architecture or quantisation transformers cannot
read, a missing tokenizer or chat template, a tokenizer with ids past the embedding, a
missing, corrupt or truncated file.
"""

from __future__ import annotations

import copy
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import Field

from components.artifacts import MANIFEST_NAME, ComponentSpec, Manifest, is_remote, local_path, produce
from components.config import StrictConfig
from components.errors import DataError
from components.locks import exclusive
from components.models.chat import prompt_ids
from components.models.tokenizers import FINGERPRINT_KEY, fingerprint_of

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

SPEC = ComponentSpec(name="import_model", version="1")
GGUF_SUFFIX = ".gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SAVE_PRETRAINED_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
T = TypeVar("T")
PROBE_PROMPT = "What is 7 + 5?"  # rendered with the chat template for the reload check


class ImportModelConfig(StrictConfig):
    chat_template: str | None = Field(
        None, description="Jinja chat template replacing the source's own (for a base model that has none).")


def import_model(config: ImportModelConfig, source: str, dest: str, overwrite: bool = False) -> Manifest:
    """Write the model at `source` (a `.gguf` file or a model directory) into `dest` as a
    transformers model artifact: safetensors weights, config, generation config, tokenizer
    and chat template."""
    if not is_remote(source):
        check_source(local_path(source))
    return produce(SPEC, config, {"source": source}, dest,
                   lambda out_dir, paths: _build(config, paths["source"], out_dir), overwrite=overwrite)


def check_source(path: Path) -> None:
    """The cheap checks on a local source, before it is hashed: it exists and is a GGUF file
    or a directory with `config.json` and safetensors weights (or an artifact)."""
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix != GGUF_SUFFIX:
            raise DataError(f"{path}: not a GGUF file (no {GGUF_SUFFIX} suffix) nor a model directory")
        return
    if (path / MANIFEST_NAME).is_file():
        return
    if not (path / "config.json").is_file():
        raise DataError(f"{path}: not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        pickled = " (pytorch_model.bin is a pickle and is never loaded; resave it with save_pretrained)" \
            if any(path.glob("*.bin")) else ""
        raise DataError(f"{path}: no *.safetensors weights{pickled}")


def _build(config: ImportModelConfig, source: Path, out_dir: Path) -> dict[str, Any]:
    if source.is_file():
        check_source(source)
        gguf_metrics = check_gguf(source)
        model, tokenizer = _load_gguf(source)
    else:
        gguf_metrics = {}
        model, tokenizer = _load_directory(source)
    if config.chat_template is not None:
        tokenizer.chat_template = config.chat_template
    check_tokenizer(source, model, tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    reload_diff = _reload_logit_diff(model, tokenizer, out_dir)
    if reload_diff != 0.0:
        raise DataError(f"{source}: the saved model's logits differ from the source's by {reload_diff:.3g}")
    return {
        "source_format": "gguf" if gguf_metrics else "transformers",
        **gguf_metrics,
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype).removeprefix("torch."),
        "vocab_size": len(tokenizer),
        "embedding_rows": model.get_input_embeddings().num_embeddings,
        "reload_max_abs_logit_diff": reload_diff,
        FINGERPRINT_KEY: fingerprint_of(tokenizer),
    }


# --------------------------------------------------------------------------- GGUF


def check_gguf(path: Path) -> dict[str, Any]:
    """The GGUF's architecture and tensor types, refused unless transformers' GGUF loader reads
    both: its architecture tables (`integrations.gguf`, `modeling_gguf_pytorch_utils`) and the
    dequantiser it uses for them (`gguf.dequantize`, which has no kernel for e.g. Q8_K or
    I32). Only the header is read (with gguf's `GGUFReader`, the loader's own reader)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        architecture = str(reader.fields["general.architecture"].contents())
    except (ValueError, OSError, IndexError, KeyError, struct.error) as error:
        raise DataError(f"{path}: not a readable GGUF file, corrupt or truncated ({_one_line(error)})") from None
    if not _architecture_supported(path, architecture):
        raise DataError(f"{path}: GGUF architecture {architecture!r} is not supported by transformers' GGUF loader")
    types = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    unreadable = sorted(name for name in types if not _dequantizable(name))
    if unreadable:
        example = next(tensor.name for tensor in reader.tensors if tensor.tensor_type.name == unreadable[0])
        raise DataError(f"{path}: GGUF tensor type {', '.join(unreadable)} (e.g. {example}) cannot be dequantised "
                        "by transformers' GGUF loader")
    return {"gguf_architecture": architecture, "gguf_tensor_types": dict(sorted(types.items()))}


def _architecture_supported(path: Path, architecture: str) -> bool:
    """transformers' own answer: its tables first, else (an architecture it renames, such as
    qwen2moe) the legacy loader's parse of the metadata, which refuses what it cannot load."""
    from transformers.integrations.gguf import is_gguf_arch_supported
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, load_gguf_checkpoint

    if is_gguf_arch_supported(architecture) or architecture in GGUF_SUPPORTED_ARCHITECTURES:
        return True
    try:
        load_gguf_checkpoint(str(path), return_tensors=False)
    except ValueError as error:
        if "not supported" in str(error):
            return False
        raise DataError(f"{path}: unreadable GGUF metadata ({_one_line(error)})") from None
    return True


def _dequantizable(type_name: str) -> bool:
    """Whether `gguf.dequantize` has a kernel for this tensor type (asked on one zero block)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    qtype = GGMLQuantizationType[type_name]
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, block_bytes), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The GGUF's model as a plain (serialisable) float32 model, and its tokenizer.

    transformers marks a GGUF-loaded model quantised and refuses to save it, so its weights
    move into a model built from the same config without the quantisation entry."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with exclusive():
            loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)  # local: no hub call
    except (ValueError, OSError, RuntimeError, KeyError, NotImplementedError) as error:
        raise DataError(f"{path}: cannot load this GGUF ({_one_line(error)})") from None
    config = copy.deepcopy(loaded.config)
    del config.quantization_config
    return model_with_weights(path, config, loaded.state_dict()), tokenizer


def model_with_weights(source: Path, config: PretrainedConfig, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A float32 causal LM built from `config` holding exactly `state`: refused when a weight is
    missing (a tied one aside), unexpected or of another shape. It is built uninitialised
    (`no_init_weights`: every weight is overwritten) on a forked RNG, so the caller's random
    streams are as they were."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with exclusive(), torch.random.fork_rng(devices=[]), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # `no_init_weights` skips it with the initialisation
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that differ from the config's, one line each after a heading
        lines = [line.strip() for line in str(error).splitlines()]
        detail = next((line for line in lines if line.startswith("size mismatch")), lines[0])
        raise DataError(f"{source}: the weights do not match config.json ({detail})") from None
    parameters = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(parameters[name]) for name in state if name in parameters}
    missing = [name for name in result.missing_keys if id(parameters.get(name)) not in loaded]
    _refuse_mismatch(source, {"missing keys": missing, "unexpected keys": result.unexpected_keys})
    return model.eval()


def _refuse_mismatch(source: Path, problems: dict[str, list[str]]) -> None:
    found = [f"{kind}: {', '.join(sorted(map(str, names))[:3])}" for kind, names in problems.items() if names]
    if found:
        raise DataError(f"{source}: the weights do not match config.json ({'; '.join(found)})")


# --------------------------------------------------------------------------- directories


def _load_directory(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model of a directory with every weight its config asks for, and its tokenizer:
    `from_pretrained` for `save_pretrained`'s file names, else (safetensors written by another
    tool, under other names) the weights of every `*.safetensors` file into the config's model."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = _load_tokenizer(path)
    if any((path / name).is_file() for name in SAVE_PRETRAINED_WEIGHTS):
        # mismatched shapes reported in `info` (and refused below), not as transformers' multi-line report
        model, info = _attempt(path, lambda: AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True))
        mismatched = [f"{name} is {list(stored)} in the file, {list(expected)} by config.json"
                      for name, stored, expected in info.get("mismatched_keys", [])]
        _refuse_mismatch(path, {"missing keys": info.get("missing_keys", []),
                                "unexpected keys": info.get("unexpected_keys", []), "mismatched keys": mismatched})
        return model.eval(), tokenizer
    config = _attempt(path, lambda: AutoConfig.from_pretrained(path, local_files_only=True))
    state = _attempt(path, lambda: {name: tensor for file in sorted(path.glob("*.safetensors"))
                                    for name, tensor in load_file(file).items()})
    return model_with_weights(path, config, state), tokenizer


def _attempt(path: Path, load: Callable[[], T]) -> T:
    """`load()` under the model lock; any failure one DataError line naming `path`."""
    try:
        with exclusive():
            return load()
    except Exception as error:  # safetensors, json and config errors share no base class
        raise DataError(f"{path}: cannot load the model ({_one_line(error)})") from None


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(f"{path}: no tokenizer (neither {' nor '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(path)  # a local directory: no hub call
    except Exception as error:  # tokenizers, json and sentencepiece errors share no base class
        raise DataError(f"{path}: the tokenizer does not load ({_one_line(error)})") from None


# --------------------------------------------------------------------------- checks


def check_tokenizer(source: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Every id the tokenizer makes has an embedding row (padded rows past it, as Qwen2 has,
    are fine), and its chat template exists and renders a user turn."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise DataError(f"{source}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} "
                        f"rows (ids {rows}..{len(tokenizer) - 1} have none): not this model's tokenizer")
    if not tokenizer.chat_template:
        raise DataError(f"{source}: the tokenizer has no chat template (chat_template.jinja or tokenizer_config.json "
                        "'chat_template'); give one in import_model's chat_template")
    try:
        prompt_ids(tokenizer, PROBE_PROMPT)
    except Exception as error:  # jinja2's errors, a template raising on purpose
        raise DataError(f"{source}: the chat template does not render a user turn ({_one_line(error)})") from None


def _reload_logit_diff(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, saved: Path) -> float:
    """Max |logit difference| between `model` and the model reloaded from `saved`, over the
    probe prompt rendered with the chat template."""
    from transformers import AutoModelForCausalLM

    with exclusive():
        reloaded = AutoModelForCausalLM.from_pretrained(saved, local_files_only=True).eval()
    return max_abs_logit_diff(model, reloaded, prompt_ids(tokenizer, PROBE_PROMPT))


def max_abs_logit_diff(a: PreTrainedModel, b: PreTrainedModel, ids: list[int]) -> float:
    """Max |a(ids) - b(ids)| over every position and vocabulary entry, in float32."""
    import torch

    with torch.no_grad():
        batch = torch.tensor([ids])
        return float((_logits(a, batch) - _logits(b, batch)).abs().max())


def _logits(model: PreTrainedModel, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch).logits.float()


def _one_line(error: BaseException) -> str:
    """The first line of an error's message (transformers' messages run over many lines)."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
