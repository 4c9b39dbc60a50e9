#!/usr/bin/env bash
# 10 000 idle authenticated connections to one relay; reports relay RSS per connection.
# Usage: bench/scenarios/idle-10k.sh
exec "$(dirname "$0")/idle.sh" 10000
