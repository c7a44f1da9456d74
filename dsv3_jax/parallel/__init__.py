"""Parallelism for DeepSeek-V3: pipeline schedules, timelines and executors."""
