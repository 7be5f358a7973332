"""Parallelism: data-parallel engine replicas behind a router (router, replicas, proxy)."""
