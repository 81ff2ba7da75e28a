"""The built-in demo task: generated data in the upstream schemas and its independent judge."""

from ppo.demo.task import judge, mean_judge_score  # noqa: F401
