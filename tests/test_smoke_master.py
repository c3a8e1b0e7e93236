import xmlrpc.client

import pytest

from tests.helpers import aio_test


@aio_test
async def test_create_and_list(running_master):
    api = running_master.proxy()
    mailing_id = await api.create_mailing("news@example.org", "News", "Hello {{ firstname }}", "<p>Hi</p>", "", "UTF-8")
    assert mailing_id >= 1
    mailings = await api.list_mailings({"id": [mailing_id]})
    assert mailings[0]["status"] == "FILLING_RECIPIENTS"


@aio_test
async def test_wrong_key(running_master):
    api = running_master.proxy(key="cm_nope_nope")
    with pytest.raises(xmlrpc.client.ProtocolError) as raised:
        await api.list_mailings()
    assert raised.value.errcode == 401
