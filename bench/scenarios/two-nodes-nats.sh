#!/usr/bin/env bash
# Two relay nodes over NATS (nats-server started on a free port). See two-nodes.sh.
# Usage: bench/scenarios/two-nodes-nats.sh
exec "$(dirname "$0")/two-nodes.sh" nats
