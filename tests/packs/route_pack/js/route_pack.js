// route_pack's editor extension (served under /extensions/route_pack/).
console.log("route_pack loaded");
