"""Input and output at the edges: atomic writes of files and directories, bounded JSON, safe safetensors.

Every output massmerge writes goes through :mod:`.atomic` (a temp file or directory next to the output, then a
rename), every JSON file from a user or a stranger through :mod:`.jsonfile` (bounded size and nesting) and
every safetensors file an artifact or a heads file holds through :mod:`.tensors`. Nothing here imports torch at
import time except :mod:`.tensors`.
"""
