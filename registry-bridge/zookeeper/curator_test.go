package zookeeper

import (
	"errors"
	"maps"
	"testing"
)

func TestParseCuratorInstance(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    CuratorInstance
		wantErr error
	}{
		{
			name: "Spring Cloud Zookeeper instance",
			in: `{"name":"orders","id":"6d1f","address":"10.0.0.5","port":8080,"sslPort":null,
				"payload":{"@class":"org.springframework.cloud.zookeeper.discovery.ZookeeperInstance","id":"orders-1","name":"orders",
				"metadata":{"instance_status":"UP","zone":"a","weight":"3"}},
				"registrationTimeUTC":1690000000000,"serviceType":"DYNAMIC","uriSpec":{"parts":[]}}`,
			want: CuratorInstance{Name: "orders", ID: "6d1f", Address: "10.0.0.5", Port: 8080, RegistrationTimeUTC: 1690000000000,
				ServiceType: "DYNAMIC", Enabled: true, Metadata: map[string]string{"instance_status": "UP", "zone": "a", "weight": "3"}},
		},
		{
			name: "flat payload, scalars only, sslPort only, disabled",
			in:   `{"name":"pay","id":"p1","address":"fd00::5","sslPort":8443,"enabled":false,"payload":{"@class":"x","tier":"gold","n":3,"ok":true,"nested":{"a":1},"list":[1],"nil":null}}`,
			want: CuratorInstance{Name: "pay", ID: "p1", Address: "fd00::5", SSLPort: 8443, Enabled: false,
				Metadata: map[string]string{"tier": "gold", "n": "3", "ok": "true"}},
		},
		{
			name: "payload that is not an object",
			in:   `{"name":"s","id":"1","address":"10.0.0.1","port":1,"payload":"just text"}`,
			want: CuratorInstance{Name: "s", ID: "1", Address: "10.0.0.1", Port: 1, Enabled: true},
		},
		{name: "not JSON", in: `{"name":`, wantErr: ErrBadJSON},
		{name: "port as string", in: `{"address":"10.0.0.1","port":"80"}`, wantErr: ErrBadJSON},
		{name: "fractional port", in: `{"address":"10.0.0.1","port":80.5}`, wantErr: ErrBadJSON},
		{name: "host name address", in: `{"address":"orders.example.com","port":80}`, wantErr: ErrBadHost},
		{name: "no address", in: `{"port":80}`, wantErr: ErrBadHost},
		{name: "port 0", in: `{"address":"10.0.0.1","port":0}`, wantErr: ErrBadPort},
		{name: "port too big", in: `{"address":"10.0.0.1","port":65536}`, wantErr: ErrBadPort},
		{name: "no port at all", in: `{"address":"10.0.0.1","port":null,"sslPort":null}`, wantErr: ErrBadPort},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseCuratorInstance([]byte(tc.in))
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("error = %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			w := tc.want
			if got.Name != w.Name || got.ID != w.ID || got.Address != w.Address || got.Port != w.Port || got.SSLPort != w.SSLPort ||
				got.RegistrationTimeUTC != w.RegistrationTimeUTC || got.ServiceType != w.ServiceType || got.Enabled != w.Enabled ||
				!maps.Equal(got.Metadata, w.Metadata) {
				t.Errorf("got %+v\nwant %+v", got, w)
			}
		})
	}
}
