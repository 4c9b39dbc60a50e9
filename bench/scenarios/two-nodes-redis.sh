#!/usr/bin/env bash
# Two relay nodes over Redis pub/sub (redis-server started on a free port). See two-nodes.sh.
# Usage: bench/scenarios/two-nodes-redis.sh
exec "$(dirname "$0")/two-nodes.sh" redis
