"""GET /omni/playground in a real browser (headless Chromium): the form is the model card, and the
image on the page is the image the API answers for the same request, pixel for pixel.

OMNI_PLAYGROUND_SCREENSHOT=PATH saves the page after the image test (docs/images/playground.png
was made that way).
"""

from __future__ import annotations

import base64
import json
import os

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from .browser import chromium
from .conftest import API_KEY, decoded_md5

pytestmark = pytest.mark.engine


def _open(driver, server):
    driver.get(server.url + "/omni/playground")
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")


def _fill(driver, values: dict[str, str]) -> None:
    for element_id, value in values.items():
        box = driver.find_element(By.ID, element_id)
        box.clear()
        box.send_keys(value)


def _generate(driver, timeout: float) -> str:
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def test_playground_image_matches_api(omni_server, tmp_path):
    server = omni_server("qwen-image")
    card = requests.get(server.url + "/omni/playground/config.json", timeout=10).json()
    models = requests.get(server.url + "/v1/models", headers=server.headers(), timeout=10).json()
    assert card["capabilities"] == models["data"][0]["omni"]["capabilities"] and card["model"] == "tiny-qwen-image"
    assert requests.get(server.url + "/omni/playground/../app.py", timeout=10).status_code == 404
    with chromium() as driver:
        _open(driver, server)
        # the form offers what the model honours, and nothing it would refuse
        shown = {e.get_attribute("data-field") for e in driver.find_elements(By.CSS_SELECTOR, "#fields input")}
        assert {"width", "height", "num_inference_steps", "seed", "true_cfg_scale", "negative_prompt"} <= shown
        assert shown <= set(card["capabilities"]["fields"]) | set(card["capabilities"]["knobs"])
        assert "num_frames" not in shown and not driver.find_element(By.ID, "upload-row").is_displayed()
        assert driver.find_element(By.ID, "partials").get_attribute("value") == ""  # streaming: off unless asked
        _fill(driver, {"api-key": API_KEY, "prompt": "a red cat on a blue chair", "field-seed": "21",
                       "field-num_inference_steps": "3", "field-width": "64", "field-height": "48"})
        assert _generate(driver, 120) == "done", driver.find_element(By.ID, "error").text
        src = driver.find_element(By.ID, "result-0").get_attribute("src")
        shown_omni = json.loads(driver.find_element(By.ID, "resolved").text)
        # the browser decoded it: the <img> has the size the request asked for
        assert driver.execute_script("const i = document.getElementById('result-0'); return [i.naturalWidth, i.naturalHeight]") == [64, 48]
        shot = os.environ.get("OMNI_PLAYGROUND_SCREENSHOT") or str(tmp_path / "playground.png")
        driver.save_screenshot(shot)
    api = requests.post(server.url + "/v1/images/generations", headers=server.headers(), timeout=120,
                        json={"model": "tiny-qwen-image", "prompt": "a red cat on a blue chair", "seed": 21,
                              "num_inference_steps": 3, "size": "64x48"}).json()
    assert src.startswith("data:image/png;base64,")
    assert decoded_md5(base64.b64decode(src.split(",", 1)[1])) == decoded_md5(base64.b64decode(api["data"][0]["b64_json"]))
    assert shown_omni["resolved"] == api["omni"]["resolved"]
    assert shown_omni["resolved"]["seed"] == 21 and shown_omni["resolved"]["num_inference_steps"] == 3


def test_playground_streams_partial_images(omni_server):
    """A family that streams: the page asks for partial images, shows each as it arrives, and ends on
    the image the unstreamed API answers, with the streamed answer's `omni` block."""
    server = omni_server("qwen-image")
    with chromium() as driver:
        _open(driver, server)
        assert driver.find_element(By.ID, "stream-row").is_displayed()
        Select(driver.find_element(By.ID, "partials")).select_by_value("2")
        _fill(driver, {"api-key": API_KEY, "prompt": "a lighthouse at dusk", "field-seed": "8",
                       "field-num_inference_steps": "4", "field-width": "64", "field-height": "64"})
        assert _generate(driver, 120) == "done", driver.find_element(By.ID, "error").text
        body = driver.find_element(By.TAG_NAME, "body")
        img = driver.find_element(By.ID, "result-0")
        assert body.get_attribute("data-partials") == "2" and img.get_attribute("data-kind") == "final"
        src = img.get_attribute("src")
        shown_omni = json.loads(driver.find_element(By.ID, "resolved").text)
    api = requests.post(server.url + "/v1/images/generations", headers=server.headers(), timeout=120,
                        json={"model": "tiny-qwen-image", "prompt": "a lighthouse at dusk", "seed": 8,
                              "num_inference_steps": 4, "size": "64x64"}).json()
    assert decoded_md5(base64.b64decode(src.split(",", 1)[1])) == decoded_md5(base64.b64decode(api["data"][0]["b64_json"]))
    assert shown_omni["resolved"] == {**api["omni"]["resolved"], "partial_images": 2}


def test_playground_shows_api_errors(omni_server):
    server = omni_server("qwen-image")
    with chromium() as driver:
        _open(driver, server)
        _fill(driver, {"api-key": "wrong-key", "prompt": "a cat"})
        assert _generate(driver, 60) == "error"
        assert "HTTP 401" in driver.find_element(By.ID, "error").text
        _fill(driver, {"api-key": API_KEY, "field-num_inference_steps": "100000"})
        assert _generate(driver, 60) == "error"
        assert "HTTP 400" in driver.find_element(By.ID, "error").text
        assert "num_inference_steps" in driver.find_element(By.ID, "error").text
        assert driver.find_elements(By.CSS_SELECTOR, "#images img") == []


def test_playground_video_progress_and_player(omni_server):
    server = omni_server("wan2.2-t2v")
    with chromium() as driver:
        _open(driver, server)
        assert driver.find_element(By.ID, "field-num_frames").is_displayed()
        assert not driver.find_element(By.ID, "stream-row").is_displayed()  # Wan declares no partial images
        _fill(driver, {"api-key": API_KEY, "prompt": "a boat at sea", "field-seed": "5"})
        assert _generate(driver, 300) == "done", driver.find_element(By.ID, "error").text
        video = driver.find_element(By.ID, "video")
        video_id = video.get_attribute("data-video-id")
        assert video.get_attribute("src").startswith("blob:")
        assert driver.find_element(By.ID, "progress").get_attribute("value") == "100"
        shown_omni = json.loads(driver.find_element(By.ID, "resolved").text)
    job = requests.get(f"{server.url}/v1/videos/{video_id}", headers=server.headers(), timeout=10).json()
    assert job["status"] == "completed" and shown_omni == job["omni"] and shown_omni["resolved"]["seed"] == 5
