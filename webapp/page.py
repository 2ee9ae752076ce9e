"""GET /: the one web page. Plain HTML and JavaScript from webapp/static, no build step."""
from flask import Blueprint, Response, current_app, send_from_directory

blueprint = Blueprint("page", __name__)


@blueprint.get("/")
def index() -> Response:
    return send_from_directory(current_app.static_folder, "index.html", mimetype="text/html")
