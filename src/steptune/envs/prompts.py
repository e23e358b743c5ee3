"""Instruction prompts per environment, in one place: what the agent is told about the world, its actions and
the ReAct format. ALFWorld's and WebShop's texts live beside their adapters (ETO's wording)."""

from __future__ import annotations

REACT_FORMAT = (
    "For each of your turns, you will be given the observation of the last turn. You should first think about the "
    "current condition and plan for your future actions, and then output your action in this turn. Your output "
    "must strictly follow this format: \"Thought: your thoughts.\\nAction: your next action\".")

TWX_INSTRUCTION = (
    "You are an agent in a text-based household. You will be given a task and a description of the room; act "
    "to complete the task.\n"
    "Available actions: look around, inventory, take OBJ, put OBJ in/on CONTAINER, open CONTAINER, "
    "close CONTAINER, move DIRECTION, examine OBJ, read OBJ, cook OBJ in APPLIANCE, slice/chop/dice OBJ with "
    "knife, prepare meal, eat OBJ.\n" + REACT_FORMAT)

SCIWORLD_INSTRUCTION = (
    "You are a helpful assistant to do some scientific experiment in an environment. In the environment, there "
    "are several rooms: kitchen, foundry, workshop, bathroom, outside, living room, bedroom, greenhouse, art "
    "studio, hallway. You should explore the environment and find the items you need to complete the experiment. "
    "You can teleport to any room in one step. All containers in the environment have already been opened, you "
    "can directly get items from the containers.\n"
    "The available actions are:\n open OBJ: open a container\n close OBJ: close a container\n activate OBJ: "
    "activate a device\n deactivate OBJ: deactivate a device\n connect OBJ to OBJ: connect electrical components\n"
    " disconnect OBJ: disconnect electrical components\n use OBJ [on OBJ]: use a device/item\n look around: "
    "describe the current room\n examine OBJ: describe an object in detail\n look at OBJ: describe a container's "
    "contents\n read OBJ: read a note or book\n move OBJ to OBJ: move an object to a container\n pick up OBJ: "
    "move an object to the inventory\n pour OBJ into OBJ: pour a liquid into a container\n mix OBJ: chemically "
    "mix a container\n teleport to LOC: teleport to a specific room\n focus on OBJ: signal intent on a task "
    "object\n wait: task no action for 10 steps\n wait1: task no action for a step\n" + REACT_FORMAT)
