"""Multi-turn rollouts: tools, environments and token-exact observations (the turn loop's parts)."""
