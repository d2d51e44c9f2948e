"""Experiments: the suite and ``massmerge evaluate`` scoring every method with one runner, into one report.

- :mod:`.pool`: what an experiment runs on (tasks, heads, labelled splits);
- :mod:`.runner`: every method scored the same way (static merges, experts, MASS as ``build`` ships it);
- :mod:`.metrics`, :mod:`.cache`: accuracies and the resumable result cache;
- :mod:`.report`: statistics, schema, Markdown, terminal and plots;
- :mod:`.suite` (with :mod:`.finetune`): the offline suite's front end; :mod:`.evaluate` (with
  :mod:`.evaluate_config`): the front end on a user's checkpoints.
"""
