"""until_disconnected: work is cancelled as soon as the client's disconnect arrives."""

import asyncio

import pytest

from roofline.server.streaming import ClientGone, until_disconnected


def _receive_disconnect_after(delay: float):
    async def receive():
        await asyncio.sleep(delay)
        return {"type": "http.disconnect"}
    return receive


def test_work_finishing_first_returns_its_result():
    async def work():
        await asyncio.sleep(0.01)
        return 42

    assert asyncio.run(until_disconnected(_receive_disconnect_after(10), work())) == 42


def test_disconnect_cancels_the_work():
    state = {}

    async def work():
        try:
            await asyncio.sleep(10)
        finally:
            state["cleaned_up"] = True

    async def main():
        with pytest.raises(ClientGone):
            await until_disconnected(_receive_disconnect_after(0.01), work())

    asyncio.run(main())
    assert state == {"cleaned_up": True}


def test_errors_from_the_work_propagate():
    async def work():
        raise ValueError("bad")

    with pytest.raises(ValueError):
        asyncio.run(until_disconnected(_receive_disconnect_after(10), work()))
