"""Generated long-context tasks in the manner of RULER (needles, variable tracking, common words, QA over generated
documents) at any length, and their evaluation under each decoding attention policy.

Entry points: tasks.TASKS, samples.make_samples, runner.evaluate_policies, report.
"""
