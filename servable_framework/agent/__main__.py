"""Entry point of one Agent process: ``python -m servable_framework.agent`` (spawned by `startup_agents`)."""

from servable_framework.agent.agent import agent_main

if __name__ == "__main__":
    agent_main()
