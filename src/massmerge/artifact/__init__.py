"""A deployable MASS model on disk: safetensors tensors plus a JSON manifest, saved once and served.

- :mod:`.manifest`: the format (schema, allowed files, cross-field rules) and :func:`read_manifest`;
- :mod:`.verify`: confinement and checksums, before any file is opened;
- :mod:`.save`: :func:`write_artifact` / :func:`save_artifact`, atomic;
- :mod:`.loader`: :func:`load`, the served :class:`~massmerge.mass.MASSModel`, every tensor checked;
- :mod:`.size`: the artifact's bytes against the base's;
- :mod:`.build`: ``massmerge build``: base, experts and heads files in, an artifact out.

Names are imported lazily (PEP 562): ``from massmerge.artifact import MANIFEST`` costs no torch import.
"""

from __future__ import annotations

from massmerge.lazy import lazy_getattr

_EXPORTS = {
    **{name: "massmerge.artifact.manifest" for name in (
        "BASE_FILE", "FACTORS_FILE", "FORMAT_VERSION", "HEADS_FILE", "HF_WEIGHTS", "MANIFEST", "MODEL_DIR", "Manifest",
        "read_manifest")},
    "verify_files": "massmerge.artifact.verify",
    "check_output_directory": "massmerge.artifact.save",
    "save_artifact": "massmerge.artifact.save",
    "write_artifact": "massmerge.artifact.save",
    "load": "massmerge.artifact.loader",
    "serve_settings": "massmerge.artifact.loader",
    "artifact_bytes": "massmerge.artifact.size",
    "base_file_bytes": "massmerge.artifact.size",
    "build_artifact": "massmerge.artifact.build",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
