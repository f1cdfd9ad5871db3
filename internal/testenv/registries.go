package testenv

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/go-zookeeper/zk"
)

// DubboProvider writes (or, with remove, deletes) the provider node a Dubbo application
// registers into ZooKeeper: /dubbo/<iface>/providers/<url-encoded proto://ip:port/iface?…>.
// params are extra URL parameters such as "version=1.0.0".
func DubboProvider(zkAddr, iface, proto, ip string, port int, remove bool, params ...string) error {
	conn, _, err := zk.Connect([]string{zkAddr}, 10*time.Second, zk.WithLogInfo(false))
	if err != nil {
		return fmt.Errorf("zookeeper %s: %w", zkAddr, err)
	}
	defer conn.Close()
	q := append([]string{"interface=" + iface, "side=provider", "application=" + strings.ToLower(iface)}, params...)
	provider := fmt.Sprintf("%s://%s:%d/%s?%s", proto, ip, port, iface, strings.Join(q, "&"))
	dir := "/dubbo/" + iface + "/providers"
	node := dir + "/" + url.QueryEscape(provider)
	if remove {
		return conn.Delete(node, -1)
	}
	path := ""
	for _, p := range strings.Split(strings.TrimPrefix(dir, "/"), "/") {
		path += "/" + p
		if _, err := conn.Create(path, nil, 0, zk.WorldACL(zk.PermAll)); err != nil && !errors.Is(err, zk.ErrNodeExists) {
			return fmt.Errorf("create %s: %w", path, err)
		}
	}
	if _, err := conn.Create(node, nil, 0, zk.WorldACL(zk.PermAll)); err != nil {
		return fmt.Errorf("register dubbo provider %s: %w", provider, err)
	}
	return nil
}

// EurekaInstance registers (or, with remove, cancels) an UP instance of app in Eureka, as a
// Spring Cloud service would, with a lease long enough that it never expires in a test.
func EurekaInstance(base, app, id, ip string, port int, remove bool) error {
	app = strings.ToUpper(app)
	var req *http.Request
	if remove {
		req, _ = http.NewRequest(http.MethodDelete, base+"/apps/"+app+"/"+id, nil)
	} else {
		body := fmt.Sprintf(`{"instance":{"instanceId":%q,"hostName":%q,"app":%q,"ipAddr":%q,"status":"UP",
			"port":{"$":%d,"@enabled":"true"},"securePort":{"$":443,"@enabled":"false"},"vipAddress":%q,
			"dataCenterInfo":{"@class":"com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo","name":"MyOwn"},
			"leaseInfo":{"renewalIntervalInSecs":3600,"durationInSecs":36000},"metadata":{"protocol":"http"}}}`,
			id, ip, app, ip, port, strings.ToLower(app))
		req, _ = http.NewRequest(http.MethodPost, base+"/apps/"+app, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("eureka %s %s: %w", req.Method, req.URL.Path, err)
	}
	resp.Body.Close()
	if resp.StatusCode >= 300 {
		return fmt.Errorf("eureka %s %s: %s", req.Method, req.URL.Path, resp.Status)
	}
	return nil
}

// EurekaUpInstance returns "ip:port" of an UP instance of app, looked up the way a plain
// (non-mesh) Eureka client does: GET /apps/<APP>.
func EurekaUpInstance(base, app string) (string, error) {
	app = strings.ToUpper(app)
	req, _ := http.NewRequest(http.MethodGet, base+"/apps/"+app, nil)
	req.Header.Set("Accept", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("eureka GET /apps/%s: %s", app, resp.Status)
	}
	var doc struct {
		Application struct {
			Instance []struct {
				IPAddr string `json:"ipAddr"`
				Status string `json:"status"`
				Port   struct {
					N int `json:"$"`
				} `json:"port"`
			} `json:"instance"`
		} `json:"application"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		return "", fmt.Errorf("eureka GET /apps/%s: %w", app, err)
	}
	for _, in := range doc.Application.Instance {
		if in.Status == "UP" {
			return fmt.Sprintf("%s:%d", in.IPAddr, in.Port.N), nil
		}
	}
	return "", fmt.Errorf("no UP instance of %s in eureka", app)
}
