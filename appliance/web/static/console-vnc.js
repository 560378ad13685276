// The recovery VM's screen: noVNC (Debian's novnc, served at /novnc) over the console's WebSocket relay.
import RFB from "/novnc/core/rfb.js";

const screen = document.getElementById("screen");
const status = document.getElementById("vnc-status");
const scheme = location.protocol === "https:" ? "wss" : "ws";
const rfb = new RFB(screen, `${scheme}://${location.host}/vms/${screen.dataset.host}/vnc`, {wsProtocols: ["binary"]});
rfb.scaleViewport = true;
rfb.addEventListener("connect", () => { status.textContent = "connected"; status.dataset.state = "connected"; });
rfb.addEventListener("disconnect", (e) => {
  status.textContent = e.detail.clean ? "disconnected" : "connection lost";
  status.dataset.state = "disconnected";
});
